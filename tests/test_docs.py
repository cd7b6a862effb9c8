"""Every command the documentation quotes runs as written.

The README, benchmarks/RESULTS.md and experiments/README.md quote `python -m X ...` lines.
Each module must exist and answer `--help`; each `micronet_jax.main` line must name a config
file that loads (with its variant) and only config keys that exist.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "benchmarks/RESULTS.md", "experiments/README.md")
COMMAND = re.compile(r"python -m ([A-Za-z_][\w.]*)([^`\n|\"]*)")  # a quoted command ends at `"`


def quoted_commands() -> list[tuple[str, str, str]]:
    """(document, module, arguments) of every `python -m` command in the docs."""
    found = []
    for doc in DOCS:
        for module, args in COMMAND.findall((REPO / doc).read_text()):
            found.append((doc, module, args.strip().rstrip("\\").strip()))
    return found


def test_the_docs_quote_commands():
    modules = {module for _, module, _ in quoted_commands()}
    assert {"micronet_jax.main", "micronet_jax.score", "benchmarks.early_exit"} <= modules


def test_no_doc_runs_a_script_by_path():
    """One form everywhere: `python -m benchmarks.X`, which also finds the package's imports."""
    for doc in DOCS:
        text = (REPO / doc).read_text()
        assert not re.search(r"python (benchmarks|experiments)/\w+\.py", text), doc


HELP_ALL = """
import runpy, sys
failed = []
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        failed.append(f"{module}: --help did not exit")
    except SystemExit as exit:
        if exit.code not in (0, None):
            failed.append(f"{module}: exit {exit.code}")
print("FAILED:" + "; ".join(failed) if failed else "OK")
"""


def test_every_quoted_module_answers_help():
    modules = sorted(
        {m for _, m, _ in quoted_commands() if m not in ("micronet_jax.main", "pytest")}
    )
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module
    done = subprocess.run(
        [sys.executable, "-c", HELP_ALL, *modules],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.stdout.strip().splitlines()[-1] == "OK", done.stdout[-2000:] + done.stderr[-2000:]


def _config_of(spec: str):
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("quoted_config", REPO / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def _has_key(config, dotted: str) -> bool:
    node = json.loads(config.to_json())
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize(
    "doc, args",
    sorted({(d, a) for d, m, a in quoted_commands() if m == "micronet_jax.main"}),
)
def test_every_quoted_main_command_parses(doc, args):
    words = [w for w in shlex.split(args.replace("…", "x")) if w.startswith("--")]
    config_flag = [w for w in words if w.startswith("--config=")]
    assert len(config_flag) == 1, (doc, args)
    spec = config_flag[0].split("=", 1)[1]
    assert (REPO / spec.partition(":")[0]).is_file(), (doc, spec)
    config = _config_of(spec)
    for word in words:
        if word.startswith("--config."):
            key = word.removeprefix("--config.").split("=", 1)[0]
            assert _has_key(config, key), (doc, word)
        else:
            assert word.split("=", 1)[0] in ("--config", "--workdir"), (doc, word)
    if config.mode != "test":
        assert any(w.startswith("--workdir=") for w in words), (doc, args)

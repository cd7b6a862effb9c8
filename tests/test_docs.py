"""Every command the documentation quotes runs as written, and every link it makes resolves.

The README, docs/*.md, benchmarks/RESULTS.md and experiments/README.md quote
`python -m X ...` lines. Each module must exist and answer `--help`; each
`micronet_jax.main` line must name a config file that loads (with its variant) and only
config keys that exist. Each relative link must name a file of the repository (and, with a
`#fragment`, one of its headings); the README must fit two screens and link every docs page.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = (
    "README.md",
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")),
    "benchmarks/RESULTS.md",
    "experiments/README.md",
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"python -m ([A-Za-z_][\w.]*)([^`\n|\"]*)")  # a quoted command ends at `"`


def quoted_commands() -> list[tuple[str, str, str]]:
    """(document, module, arguments) of every `python -m` command in the docs, a command's
    continuation lines (after a trailing backslash) joined to it."""
    found = []
    for doc in DOCS:
        text = re.sub(r"\\\n\s*", " ", (REPO / doc).read_text())
        for module, args in COMMAND.findall(text):
            found.append((doc, module, args.strip()))
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
import contextlib, io, json, runpy, sys
failed, helps = [], {}
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        failed.append(f"{module}: --help did not exit")
    except SystemExit as exit:
        if exit.code not in (0, None):
            failed.append(f"{module}: exit {exit.code}")
    helps[module] = text.getvalue()
print(json.dumps(helps))
print("FAILED:" + "; ".join(failed) if failed else "OK")
"""


@functools.cache
def help_texts() -> tuple[str, dict[str, str]]:
    """('OK' or what failed, {module: its --help}) of every quoted module but pytest."""
    modules = sorted({m for _, m, _ in quoted_commands() if m != "pytest"})
    done = subprocess.run(
        [sys.executable, "-c", HELP_ALL, *modules],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = done.stdout.strip().splitlines()
    return lines[-1] + done.stderr[-2000:] * (lines[-1] != "OK"), json.loads(lines[-2])


def test_every_quoted_module_answers_help():
    modules = sorted({m for _, m, _ in quoted_commands() if m != "pytest"})
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module
    status, _ = help_texts()
    assert status == "OK", status


def test_every_quoted_flag_is_one_its_command_takes():
    """Each `--flag` of a quoted command (continuation lines included) is in that command's
    --help: a renamed or removed flag fails here (`main`'s --config.* keys are checked
    against the config below)."""
    _, helps = help_texts()
    unknown = []
    for doc, module, args in quoted_commands():
        if module in ("pytest", "micronet_jax.main"):
            continue
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", args):
            if not re.search(rf"{re.escape(flag)}\b", helps[module]):
                unknown.append(f"{doc}: {module} {flag}")
    assert not unknown, unknown


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


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    anchors = set()
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
            anchors.add(slug)
    return anchors


def test_every_relative_link_resolves():
    broken = []
    for doc in DOCS:
        source = REPO / doc
        for target in LINK.findall(source.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            resolved = (source.parent / path).resolve() if path else source
            if not resolved.exists():
                broken.append(f"{doc}: {target} (no {resolved})")
            elif fragment and fragment not in heading_anchors(resolved.read_text()):
                broken.append(f"{doc}: {target} (no heading #{fragment})")
    assert not broken, "\n".join(broken)


def test_the_readme_fits_two_screens_and_links_every_docs_page():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    linked = {target.partition("#")[0] for target in LINK.findall(text)}
    pages = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert pages and pages <= linked, sorted(pages - linked)


def test_no_doc_or_module_cites_a_file_outside_the_repository():
    """The repository stands alone: no pointer to the specification or design notes it was
    built from."""
    texts = [REPO / doc for doc in DOCS] + sorted((REPO / "micronet_jax").rglob("*.py"))
    cited = [
        str(path.relative_to(REPO))
        for path in texts
        if re.search(r"\bSPEC\b|SPEC\.md|DESIGN\.md|§\s*\d", path.read_text())
    ]
    assert not cited, cited


@pytest.mark.slow
@pytest.mark.shared
def test_the_readme_python_runs_and_prints_what_it_says(original_checkpoints, capsys):
    """The README's two Python blocks, as written (the checkpoint path pointed at the
    original's released file); the first prints the scores its comment gives."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    exec(blocks[0], namespace)
    printed = capsys.readouterr().out.strip()
    assert "# " + printed in blocks[0]
    pth = original_checkpoints / "first_submission" / "trained_model.pth"
    exec(blocks[1].replace('"trained_model.pth"', repr(str(pth))), namespace)
    assert namespace["result"].predictions.shape == (8,)


def package_map() -> str:
    """The code block under docs/architecture.md's 'The package map' heading."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## The package map", 1)[1]
    return section.split("```", 2)[1]


def test_the_architecture_map_names_every_module():
    """Each module of the package is named in the map, under its subpackage's entry (or
    at the top level): a new module the map leaves out fails here."""
    block = package_map()
    entries: dict[str, str] = {}
    current = "top"
    for line in block.splitlines():
        match = re.match(r"  (\w+)/\s", line)
        if match:
            current = match.group(1)
        elif re.match(r"  \w+\.py\s", line):
            current = "top"
        entries[current] = entries.get(current, "") + line + "\n"
    package = REPO / "micronet_jax"
    missing = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "__init__.py" and path.parent != package:
            continue
        relative = path.relative_to(package)
        if len(relative.parts) == 1:
            if not re.search(rf"^\s+{re.escape(path.name)}\s", entries.get("top", ""), re.M):
                missing.append(str(relative))
        elif not re.search(rf"\b{re.escape(path.stem)}\b", entries.get(relative.parts[0], "")):
            missing.append(str(relative))
    assert not missing, f"docs/architecture.md's package map leaves out {missing}"

"""The tiny test network run the way a user runs it: its config, the command line
(`python -m micronet_jax.main` in a subprocess) and what a finished run leaves behind.
Shared by the tests of the loop, the pipeline and the command line, and by the kill/resume
benchmark."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.py"
VOLATILE = {"images_per_sec", "wall_time"}  # metrics that depend on the machine's speed
# The suite's XLA flags (see conftest): no LLVM optimisation passes, XLA's older CPU fusion
# emitter.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def tiny_config(variant: str = "") -> Any:
    """`tests/configs/tiny.py`'s config ('' or 'pipeline')."""
    spec = importlib.util.spec_from_file_location("tiny_config", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def stable(records: list[dict]) -> list[dict]:
    """Metric records without the fields that depend on the machine's speed."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def main_command(
    workdir: Path, archive: Path, *overrides: str, config: str = f"{TINY}:pipeline"
) -> list[str]:
    """The command line for `config` (default: the tiny pipeline) on `archive`."""
    return [
        sys.executable,
        "-m",
        "micronet_jax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.data.dir={archive}",
        *overrides,
    ]


def run_main(
    workdir: Path,
    archive: Path,
    *overrides: str,
    env: dict[str, str],
    config: str = f"{TINY}:pipeline",
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    """`main_command` run to its end in `env`, its output captured as text."""
    return subprocess.run(
        main_command(workdir, archive, *overrides, config=config),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def xla_flags(*flags: str) -> str:
    """`flags` added to this process's XLA_FLAGS (the suite's compile flags, see conftest), for
    a child that needs flags of its own (a number of simulated devices)."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def main_env(cache: Path) -> dict[str, str]:
    """This checkout importable, and its own compilation cache under `cache`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["MICRONET_CACHE_DIR"] = str(cache)
    return env


def with_fast_compile(flags: str) -> str:
    """`flags` (an XLA_FLAGS value) with the suite's fast-compile flags added."""
    missing = [flag for flag in FAST_COMPILE if flag not in flags.split()]
    return " ".join([flags, *missing]).strip()


def user_env(cache: Path) -> dict[str, str]:
    """`main_env` without the suite's fast-compile flags, so compiled as a user's run is.

    For a child that runs the released network over thousands of images, where XLA's
    optimisation passes pay for themselves (its predictions run ~6x faster for ~1 s more
    compile), and for the runs whose K steps per dispatch are compared bit for bit with one
    step at a time: at optimisation level 0 the older fusion emitter compiles a `lax.scan`
    body's parameter update differently from the same step compiled alone (~1e-7 apart),
    while XLA's default flags give the identity docs/multihost.md promises.
    """
    env = main_env(cache)
    kept = [f for f in env.get("XLA_FLAGS", "").split() if f not in FAST_COMPILE]
    env["XLA_FLAGS"] = " ".join(kept)
    return env


def pipeline_outcome(workdir: Path, variant: str = "pipeline") -> dict:
    """Everything a tiny pipeline run produces that must not depend on interruptions: each
    stage's metrics and summary, the report's metrics and scores, the final stage's
    variables and masks. The stages are those of the config the run recorded (`variant`'s
    when it recorded none)."""
    import jax

    from micronet_jax.recipe.run_plots import load_run_config
    from micronet_jax.recipe.stages import load_final, plan_stages
    from micronet_jax.train import metrics as metrics_io

    config = load_run_config(workdir) or tiny_config(variant)
    stages = plan_stages(config)
    result = {}
    for stage in stages:
        records = metrics_io.read_records(workdir / stage.name / "metrics.jsonl")
        result[f"{stage.name}/metrics"] = stable(records)
        done = json.loads((workdir / stage.name / "done.json").read_text())
        done["final"] = stable([done["final"]])[0]
        done.pop("seconds")  # the stage's wall time
        result[f"{stage.name}/done"] = done
    report = json.loads((workdir / "report.json").read_text())
    result["report"] = report["metrics"]
    result["scores"] = {k: v["score"] for k, v in report.items() if k.startswith("score_")}
    variables, masks = load_final(config, stages[-1], workdir / stages[-1].name)
    result["leaves"] = [np.asarray(x) for x in jax.tree.leaves((variables, masks))]
    return result

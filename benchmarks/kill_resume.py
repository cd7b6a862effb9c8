"""SIGKILL the tiny pipeline at many random moments, resume each time, compare with a clean run.

    python -m benchmarks.kill_resume --kills 10 --seed 0 [--root /tmp/kill_resume]

Runs `python -m micronet_jax.main --config=tests/configs/tiny.py:pipeline` on a generated
CIFAR-10 archive: once uninterrupted (the reference, which also warms the compile cache),
then again with `--kills` SIGKILLs, each a random 0-4 s after a random point of progress
(epochs logged + stages finished) is reached, so kills land in start-up, compilation,
training, checkpoint writes, stage hand-overs and the report. Prints where each kill landed
(read from the workdir: finished stages, the current stage's last logged epoch and latest
checkpoint) and whether the final params, masks, per-stage metrics and report match the
reference bit for bit.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from archives import make_cifar10_python_archive  # noqa: E402
from tiny_run import main_command, main_env, pipeline_outcome, tiny_config  # noqa: E402

from micronet_jax.errors import CommandParser  # noqa: E402
from micronet_jax.train import metrics as metrics_io  # noqa: E402


def run(workdir: Path, archive: Path, cache: Path, kill_at: tuple[int, float] | None = None):
    """'finished', 'killed' or 'failed (status)'. `kill_at` (events, seconds): SIGKILL
    `seconds` after the workdir shows `events` (see `events_of`); timing-independent, so
    kills land everywhere from start-up to the report however loaded the machine is."""
    proc = subprocess.Popen(
        main_command(workdir, archive),
        env=main_env(cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if kill_at is None:
        proc.wait()
    else:
        events, seconds = kill_at
        while proc.poll() is None and events_of(workdir) < events:
            time.sleep(0.05)
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "killed"
    return "finished" if proc.returncode == 0 else f"failed ({proc.returncode})"


def events_of(workdir: Path) -> int:
    """Progress: epochs logged plus stages finished, over all stages (0..10 here)."""
    if not workdir.exists():
        return 0
    logged = sum(len(metrics_io.read_records(p)) for p in workdir.glob("*/metrics.jsonl"))
    return logged + len(list(workdir.glob("*/done.json")))


def stage_starts(reference: Path) -> list[int]:
    """The progress count (see `events_of`) at which each stage of the reference run began."""
    starts, events = [], 0
    for name in stages_of():
        starts.append(events)
        events += len(metrics_io.read_records(reference / name / "metrics.jsonl")) + 1
    return starts


def stages_of() -> list[str]:
    from micronet_jax.recipe.stages import plan_stages

    return [s.name for s in plan_stages(tiny_config("pipeline"))]


def where(workdir: Path) -> str:
    """Which stage the workdir is in, its last logged epoch and latest checkpoint step."""
    for name in stages_of():
        stage = workdir / name
        if (stage / "done.json").exists():
            continue
        if not stage.exists():
            return f"{name}: not started"
        epochs = [r["epoch"] for r in metrics_io.read_records(stage / "metrics.jsonl")]
        ckpts = sorted(int(p.name) for p in (stage / "checkpoints").glob("*") if p.name.isdigit())
        tmp = [p.name for p in (stage / "checkpoints").glob("*tmp*")]
        final = " final-written" if (stage / "final").exists() else ""
        return (
            f"{name}: epochs logged {epochs or '-'}, checkpoints {ckpts or '-'}"
            f"{', unfinished ' + str(tmp) if tmp else ''}{final}"
        )
    return "all stages done" + ("" if (workdir / "report.json").exists() else ", no report")


def differences(got: dict, want: dict) -> list[str]:
    diffs = [k for k in want if k != "leaves" and got.get(k) != want[k]]
    leaves = zip(got["leaves"], want["leaves"], strict=True)
    if len(got["leaves"]) != len(want["leaves"]) or any(
        not np.array_equal(a, b) for a, b in leaves
    ):
        diffs.append("final params/masks")
    return diffs


def main() -> int:
    parser = CommandParser(
        prog="python -m benchmarks.kill_resume", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=Path("/tmp/micronet_kill_resume"))
    args = parser.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    args.root.mkdir(parents=True)
    archive = args.root / "cifar-10-python.tar.gz"
    make_cifar10_python_archive(archive, n_train=160, n_test=32)
    cache = args.root / "cache"
    tic = time.time()
    print(f"reference run: {run(args.root / 'reference', archive, cache)}", flush=True)
    print(f"  ({time.time() - tic:.0f} s, compiling into a fresh cache)\n", flush=True)
    total = events_of(args.root / "reference")
    rng = random.Random(args.seed)
    # one kill inside every stage (so every stage kind is hit), the rest anywhere
    starts = stage_starts(args.root / "reference")
    plan = [(start, rng.uniform(0.0, 4.0)) for start in starts[: args.kills]]
    plan += [(rng.randrange(total), rng.uniform(0.0, 4.0)) for _ in range(args.kills - len(plan))]
    plan.sort()
    workdir = args.root / "killed"
    print("| # | kill when | outcome | workdir state after the kill |")
    print("|---|---|---|---|")
    for i, (events, seconds) in enumerate(plan, 1):
        result = run(workdir, archive, cache, kill_at=(events, seconds))
        when = f"{seconds:.1f} s after {events}/{total} events"
        print(f"| {i} | {when} | {result} | {where(workdir)} |", flush=True)
        if result != "killed":
            break
    print(f"\nfinal rerun: {run(workdir, archive, cache)}")
    diffs = differences(pipeline_outcome(workdir), pipeline_outcome(args.root / "reference"))
    print("bit-identical to the uninterrupted run" if not diffs else f"DIFFERENT: {diffs}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())

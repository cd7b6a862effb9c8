"""Runs survive signals, kills, damaged checkpoints, NaNs, full disks and config changes.

Most tests drive `fit` in-process with a toy linear model (`toy_run`, compiles in a second);
the K-steps-per-dispatch comparisons run the toy in a child compiled with XLA's default flags;
the kill-anywhere test runs the whole tiny pipeline through the command line.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_run import TINY as TINY_CONFIG
from tiny_run import (
    main_command,
    main_env,
    pipeline_outcome,
    run_main,
    stable,
    tiny_config,
    user_env,
)
from toy_run import BATCH, EPOCHS, K_CASES, N, SignalAt, params_of, toy_fit, toy_state

from micronet_jax.config.workdir import check_resume, record_config
from micronet_jax.errors import CheckpointError, ConfigError
from micronet_jax.train import loop
from micronet_jax.train import metrics as metrics_io
from micronet_jax.train.checkpoint import Checkpointer
from micronet_jax.train.guard import Interrupted, NonFiniteError

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def toy_reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("toy") / "run"
    state, records = toy_fit(workdir)
    return workdir, state, records


@pytest.mark.parametrize("signum, at_step", [(signal.SIGTERM, 7), (signal.SIGINT, 13)])
def test_signal_saves_mid_epoch_and_resume_is_exact(toy_reference, tmp_path, signum, at_step):
    _, ref_state, ref_records = toy_reference
    workdir = tmp_path / "run"
    handler_before = signal.getsignal(signum)
    with pytest.raises(Interrupted, match=f"signal {signum}") as caught:
        toy_fit(workdir, progress=SignalAt(at_step, signum))
    assert caught.value.exit_code == 128 + signum
    assert signal.getsignal(signum) is handler_before  # the run's handler did not leak
    ckpt = Checkpointer(workdir / "checkpoints")
    assert ckpt.latest_step() == at_step  # saved at the step boundary after the signal
    _, meta, _ = ckpt.restore(toy_state())
    ckpt.close()
    assert meta["partial"]["index"] == at_step % 5
    state, records = toy_fit(workdir)
    assert stable(records) == stable(ref_records)
    for got, want in zip(params_of(state), params_of(ref_state), strict=True):
        np.testing.assert_array_equal(got, want)


def test_nan_stops_at_that_step_and_keeps_the_last_checkpoint(toy_reference, tmp_path):
    ref_dir, _, _ = toy_reference
    workdir = tmp_path / "run"
    where = r"stage train, epoch 2, step 3 of 5 \(global step 7\)"
    with pytest.raises(NonFiniteError, match=where):
        toy_fit(workdir, inject_nan_step=7, nan_check_every=1)
    records = metrics_io.read_records(workdir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1]
    ckpt, ref = Checkpointer(workdir / "checkpoints"), Checkpointer(ref_dir / "checkpoints")
    assert ckpt.steps() == [5]
    good, _, _ = ckpt.restore(toy_state())
    want, _, _ = ref.restore(toy_state(), step=5)
    ckpt.close(), ref.close()
    for a, b in zip(params_of(good), params_of(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_nan_checked_lazily_is_still_never_saved(tmp_path):
    """With reads every 100 steps the epoch-end check still runs before the save."""
    workdir = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"global step 7\)"):
        toy_fit(workdir, inject_nan_step=7, nan_check_every=100)
    assert Checkpointer(workdir / "checkpoints").steps() == [5]


def test_nan_skip_counts_and_continues(tmp_path):
    state, records = toy_fit(tmp_path / "run", inject_nan_step=7, nan_policy="skip")
    assert [r["skipped_steps"] for r in records] == [0, 1, 0, 0]
    assert int(state.step) == EPOCHS * 5
    assert all(np.isfinite(p).all() for p in params_of(state))
    assert all(np.isfinite(r["train_loss"]) for r in records)


# --- several steps per dispatch ----------------------------------------------------------


def test_dispatch_groups_cover_the_epoch_with_two_programs():
    sizes = (8,) * 5 + (4,)
    groups = list(loop.dispatch_groups(sizes, 0, 2))
    assert groups == [(0, 8, 2), (2, 8, 2), (4, 8, 1), (5, 4, 1)]
    assert list(loop.dispatch_groups(sizes, 3, 2)) == [(3, 8, 2), (5, 4, 1)]
    assert [g[2] for g in loop.dispatch_groups(sizes, 0, 1)] == [1] * 6


@pytest.fixture(scope="module")
def k_step_runs(tmp_path_factory, compile_cache) -> dict:
    """`toy_run.k_step_runs` in a child compiled with XLA's default flags, as a user's run
    is: the suite's fast-compile flags break the identity (`tiny_run.user_env`)."""
    out = tmp_path_factory.mktemp("k_steps") / "runs.pickle"
    done = subprocess.run(  # the script's folder, tests/, is on the child's path
        [sys.executable, str(TESTS / "toy_run.py"), str(out)],
        env=user_env(compile_cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return pickle.loads(out.read_bytes())


@pytest.mark.xdist_group("toy_k_steps")
@pytest.mark.parametrize("n, k", K_CASES)
def test_k_steps_per_dispatch_are_bit_identical_to_one(k_step_runs, n, k):
    one, grouped = k_step_runs[n, 1], k_step_runs[n, k]
    steps = EPOCHS * len(loop.Schedule(1, BATCH, n, batch_multiple=1).batch_sizes)
    assert grouped["step"] == one["step"] == steps
    for got, want in zip(grouped["params"], one["params"], strict=True):
        np.testing.assert_array_equal(got, want)
    assert grouped["records"] == one["records"]


@pytest.mark.xdist_group("toy_k_steps")
def test_k_steps_signal_stops_at_a_group_boundary_and_resumes_exactly(k_step_runs):
    """SIGTERM after step 7, inside the group of steps 5-8: the run stops at the group's
    end, checkpoints step 9, and resuming at K = 4 ends as the uninterrupted K = 1 run."""
    stopped, reference = k_step_runs["signal"], k_step_runs[N, 1]
    assert stopped["exit_code"] == 128 + signal.SIGTERM
    assert stopped["latest_step"] == 9
    assert stopped["records"] == reference["records"]
    for got, want in zip(stopped["params"], reference["params"], strict=True):
        np.testing.assert_array_equal(got, want)


def test_k_steps_nan_inside_a_group_is_found_and_never_saved(tmp_path):
    with pytest.raises(NonFiniteError, match=r"global step 7\)"):
        toy_fit(tmp_path / "run", inject_nan_step=7, steps_per_dispatch=4)
    assert Checkpointer(tmp_path / "run" / "checkpoints").steps() == [5]
    state, records = toy_fit(
        tmp_path / "skip", inject_nan_step=7, nan_policy="skip", steps_per_dispatch=4
    )
    assert [r["skipped_steps"] for r in records] == [0, 1, 0, 0]


def _damage(step_dir: Path, how: str) -> None:
    for f in step_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            if how == "garbage":
                f.write_bytes(os.urandom(f.stat().st_size))
            else:
                with open(f, "r+b") as handle:
                    handle.truncate(f.stat().st_size // 3)


@pytest.mark.parametrize("how", ["garbage", "truncate"])
def test_damaged_latest_checkpoint_falls_back(toy_reference, tmp_path, caplog, how):
    ref_dir, _, _ = toy_reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    _damage(workdir / "checkpoints" / "20", how)
    ckpt = Checkpointer(workdir / "checkpoints")
    with caplog.at_level(logging.WARNING):
        _, meta, step = ckpt.restore(toy_state())
    ckpt.close()
    assert step == 15 and meta["epoch"] == 3
    assert "checkpoints/20 is unreadable" in caplog.text
    assert [p.name[:3] for p in (workdir / "checkpoints.damaged").iterdir()] == ["20-"]
    _, records = toy_fit(workdir)  # resumes from 15 and redoes epoch 4
    assert stable(records) == stable(metrics_io.read_records(ref_dir / "metrics.jsonl"))


def test_all_checkpoints_damaged_is_one_clear_error(toy_reference, tmp_path):
    ref_dir, _, _ = toy_reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    for step_dir in (workdir / "checkpoints").iterdir():
        if step_dir.is_dir():
            _damage(step_dir, "garbage")
    with pytest.raises(CheckpointError, match=f"no readable checkpoint in {workdir}.*step 20"):
        toy_fit(workdir)


def test_unfinished_orbax_directory_is_ignored(toy_reference, tmp_path):
    ref_dir, _, ref_records = toy_reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    unfinished = workdir / "checkpoints" / "25.orbax-checkpoint-tmp-1234"
    (unfinished / "state").mkdir(parents=True)
    (unfinished / "state" / "junk").write_bytes(b"half written")
    assert Checkpointer(workdir / "checkpoints").latest_step() == 20
    _, records = toy_fit(workdir)
    assert stable(records) == stable(ref_records)


def test_low_disk_space_refuses_to_checkpoint(tmp_path, monkeypatch):
    from micronet_jax.train import checkpoint

    usage = shutil.disk_usage(tmp_path)._replace(free=10 << 20)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(CheckpointError, match=r"only 10.0 MB free .* needs 50.0 MB"):
        toy_fit(tmp_path / "run")
    assert not any((tmp_path / "run" / "checkpoints").glob("[0-9]*"))


def test_metrics_reader_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    metrics_io.append_record(path, {"epoch": 1, "loss": 1.5})
    metrics_io.append_record(path, {"epoch": 2, "loss": 1.25})
    with open(path, "a") as f:
        f.write('{"epoch": 3, "lo')  # killed mid-write
    assert [r["epoch"] for r in metrics_io.read_records(path)] == [1, 2]
    metrics_io.truncate_after(path, "epoch", 1)
    assert path.read_text() == '{"epoch": 1, "loss": 1.5}\n'
    metrics_io.append_record(path, {"epoch": 2, "loss": 1.0})
    assert [r["loss"] for r in metrics_io.read_records(path)] == [1.5, 1.0]


# --- config changes on resume -----------------------------------------------------------


def test_resume_with_another_recipe_is_refused(tmp_path):
    workdir = tmp_path / "run"
    record_config(tiny_config(), workdir)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["train"]["lr"] == 0.13
    same = tiny_config()
    same.train.eval_every = 5  # not part of the recipe
    same.data.dir = "/elsewhere"
    check_resume(same, workdir)
    other = tiny_config()
    other.train.lr = 0.5
    other.model.width = 2.0
    with pytest.raises(ConfigError, match=r"model.width: 1.0 -> 2.0; train.lr: 0.13 -> 0.5"):
        check_resume(other, workdir)


def test_force_restart_moves_the_old_run_aside(tmp_path):
    workdir = tmp_path / "run"
    record_config(tiny_config(), workdir)
    (workdir / "metrics.jsonl").write_text("{}\n")
    other = tiny_config()
    other.train.lr = 0.5
    other.force_restart = True
    check_resume(other, workdir)
    record_config(other, workdir)
    old = [p for p in workdir.iterdir() if p.name.startswith(".old-")]
    assert len(old) == 1 and (old[0] / "metrics.jsonl").exists()
    assert json.loads((workdir / "config.json").read_text())["train"]["lr"] == 0.5
    assert not (workdir / "metrics.jsonl").exists()


# --- the whole pipeline, SIGKILLed anywhere ---------------------------------------------


def finish(
    workdir: Path,
    archive: Path,
    cache: Path,
    *overrides: str,
    config: str = f"{TINY_CONFIG}:pipeline",
    env: dict[str, str] | None = None,
) -> None:
    """Run (or resume) the pipeline to its end; `env` defaults to `main_env(cache)`."""
    done = run_main(
        workdir, archive, *overrides, config=config, env=env or main_env(cache), timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]


def epochs_recorded(workdir: Path) -> int:
    """Epoch records written so far, over every stage of the run."""
    return sum(len(metrics_io.read_records(path)) for path in workdir.glob("*/metrics.jsonl"))


def run_killed_after(
    workdir: Path,
    archive: Path,
    cache: Path,
    epochs: int,
    delay: float,
    *overrides: str,
    env: dict[str, str] | None = None,
) -> bool:
    """Start the pipeline (resuming), SIGKILL it `delay` seconds after its `epochs`-th epoch
    record (a moment set by the run's progress, not the clock, so a busy machine moves it no
    later in the run); False when it finished first. `env` defaults to `main_env(cache)`."""
    proc = subprocess.Popen(
        main_command(workdir, archive, *overrides),
        env=env or main_env(cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while proc.poll() is None and epochs_recorded(workdir) < epochs and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def kill_when_written(command: list[str], cache: Path, path: Path) -> None:
    """Start `command`, SIGKILL it as soon as `path` exists (a checkpoint it writes)."""
    proc = subprocess.Popen(
        command, env=main_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    while proc.poll() is None and not path.exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_same_outcome(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if key == "leaves":
            for a, b in zip(got[key], want[key], strict=True):
                np.testing.assert_array_equal(a, b)
        else:
            assert got[key] == want[key], key


# The killed run dispatches its steps 4 at a time: each 5-step epoch runs as one 4-step
# program (a lax.scan) and a single step; the reference runs them one at a time.
FOUR_PER_DISPATCH = "--config.train.steps_per_dispatch=4"


@pytest.mark.slow
def test_pipeline_at_4_steps_per_dispatch_killed_anywhere_resumes_exactly_as_one(
    tiny_pipeline, tmp_path, tiny_archive, compile_cache
):
    """Three SIGKILLs, each a random fraction of a second after a random epoch of the five
    stages (baseline, two pruning rounds, exit head, exit pruning) ended: while it evaluates,
    writes a checkpoint, a summary or the next stage's start, or inside the next epoch's
    group of steps. The resumed run ends bit-identical to the uninterrupted one, which ran
    its steps one per dispatch: the results depend neither on the kills nor on K. (Kills at
    a chosen step inside a group and K with a partial last batch: the K-step tests above;
    at random wall-clock moments: `python -m benchmarks.kill_resume`.) Compiled, like the
    reference, with XLA's default flags, as a user's runs are (`tiny_run.user_env`)."""
    reference, archive, cache = tiny_pipeline[1], tiny_archive, compile_cache
    workdir, env = tmp_path / "killed", user_env(cache)
    rng = random.Random(1234)
    moments = sorted(rng.sample(range(1, 5), 3))
    kills = sum(
        run_killed_after(
            workdir, archive, cache, epochs, rng.uniform(0.0, 1.5), FOUR_PER_DISPATCH, env=env
        )
        for epochs in moments
    )
    assert kills >= 3, "the run finished before it could be killed three times"
    finish(workdir, archive, cache, FOUR_PER_DISPATCH, env=env)
    assert_same_outcome(pipeline_outcome(workdir), pipeline_outcome(reference))


@pytest.mark.slow
def test_cli_reports_when_every_checkpoint_is_damaged(
    tiny_pipeline, tmp_path, tiny_archive, compile_cache
):
    reference, archive, cache = tiny_pipeline[1], tiny_archive, compile_cache
    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copy(reference / "config.json", workdir)
    shutil.copytree(reference / "stage_a", workdir / "stage_a")
    (workdir / "stage_a" / "done.json").unlink()
    shutil.rmtree(workdir / "stage_a" / "final")
    for step_dir in (workdir / "stage_a" / "checkpoints").iterdir():
        _damage(step_dir, "garbage")
    done = run_main(workdir, archive, env=main_env(cache), timeout=600)
    assert done.returncode == 2
    assert f"error: no readable checkpoint in {workdir}/stage_a/checkpoints" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_quantize_stage_killed_and_resumed_equals_an_uninterrupted_run(
    tmp_path, tiny_archive, compile_cache
):
    """A pipeline ending in the quantize stage (4-bit weights, 8-bit activations): its report
    carries the quantised score, and SIGKILLed inside that stage it resumes bit-identically.
    The killed run starts from the reference's finished earlier stages (a copy without the
    quantize stage and the report), so only the stage under test runs twice."""
    config = f"{TINY_CONFIG}:quantized"
    reference = tmp_path / "reference"
    done = run_main(
        reference, tiny_archive, config=config, env=main_env(compile_cache), timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((reference / "report.json").read_text())
    quantized, fp32 = report["score_quantized"], report["score_actual_masks"]
    assert report["bits"].startswith("weights 4-bit, activations 8-bit")
    assert quantized["param_score"] < fp32["param_score"]  # 4-bit kernels beat the freebie
    assert {"main_agreement", "exit_agreement", "combined_agreement"} <= set(report["metrics"])
    assert "quantize" in [s["stage"] for s in report["stages"]]

    killed = Path(shutil.copytree(reference, tmp_path / "killed"))
    shutil.rmtree(killed / "quantize")
    for name in ("report.json", "report.md"):
        (killed / name).unlink()
    first_epoch = killed / "quantize" / "checkpoints" / "5"
    kill_when_written(main_command(killed, tiny_archive, config=config), compile_cache, first_epoch)
    assert first_epoch.exists() and not (killed / "quantize" / "done.json").exists()
    finish(killed, tiny_archive, compile_cache, config=config)
    assert_same_outcome(
        pipeline_outcome(killed, "quantized"), pipeline_outcome(reference, "quantized")
    )

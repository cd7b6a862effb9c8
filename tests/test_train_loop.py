"""The epoch loop: metrics, checkpoints, exact resume after SIGKILL, determinism."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from tiny_run import TINY, main_command, main_env, stable

from micronet_jax.train import metrics as metrics_io


def _run(workdir: Path, archive: Path, cache: Path, *overrides: str) -> None:
    done = subprocess.run(
        main_command(workdir, archive, *overrides, config=str(TINY)),
        env=main_env(cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def reference_run(build_once, tiny_archive, compile_cache) -> tuple[Path, Path]:
    """Stage A of the tiny network, run once per session (the tests only read it)."""

    def build(folder: Path) -> None:
        _run(folder / "run", tiny_archive, compile_cache)

    return build_once("train_loop_reference", build) / "run", compile_cache


@pytest.mark.slow
def test_run_writes_metrics_and_checkpoints(reference_run):
    workdir, _ = reference_run
    records = metrics_io.read_records(workdir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    steps_per_epoch = 160 // 32
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for r in records:
        for key in (
            "lr",
            "train_loss",
            "train_accuracy",
            "test_loss",
            "test_accuracy",
            "images_per_sec",
            "wall_time",
        ):
            assert key in r
    assert records[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the last epoch runs at lr 0
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == 4 * steps_per_epoch
    assert any((workdir / "best").iterdir())


@pytest.mark.slow
def test_other_seed_other_metrics(reference_run, tmp_path, tiny_archive):
    workdir, cache = reference_run
    _run(tmp_path / "other", tiny_archive, cache, "--config.seed=1")
    first = stable(metrics_io.read_records(workdir / "metrics.jsonl"))
    other = stable(metrics_io.read_records(tmp_path / "other" / "metrics.jsonl"))
    assert first[0]["train_loss"] != other[0]["train_loss"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches(reference_run, tmp_path, tiny_archive):
    """Kill after the first checkpoint, inside a later epoch; the rerun finishes identically.
    (So the same seed gives the same metrics: the killed run's first epoch, trained afresh,
    must equal the reference's too.)"""
    workdir, cache = reference_run
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        main_command(killed, tiny_archive, config=str(TINY)),
        env=main_env(cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(metrics_io.read_records(killed / "metrics.jsonl")) >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = metrics_io.read_records(killed / "metrics.jsonl")
    assert len(interrupted) < 4
    _run(killed, tiny_archive, cache)
    expected = stable(metrics_io.read_records(workdir / "metrics.jsonl"))
    assert stable(metrics_io.read_records(killed / "metrics.jsonl")) == expected

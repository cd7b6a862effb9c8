"""The epoch loop: metrics, checkpoints, exact resume after SIGKILL, determinism."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from tiny_run import TINY, main_command, main_env, run_main, stable

from micronet_jax.train import metrics as metrics_io


def _run(workdir: Path, archive: Path, cache: Path, *overrides: str) -> None:
    done = run_main(
        workdir, archive, *overrides, config=str(TINY), env=main_env(cache), timeout=600
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


def test_train_steps_lower_the_loss_on_a_fixed_batch():
    """Twenty steps of `train_step` on one batch of 32 images (no AutoAugment, mixup or label
    smoothing) lower its cross entropy, both as the steps measure it and in eval mode before
    against after: a sign error in the loss, the gradient or the update raises it instead."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from tiny_run import tiny_config

    from micronet_jax.config import builders
    from micronet_jax.models.efficientnet import init_variables
    from micronet_jax.train.state import create_train_state
    from micronet_jax.train.steps import StepConfig, predict, train_step

    model = builders.model_from_config(tiny_config())
    state = create_train_state(
        model.apply, init_variables(model, jax.random.key(0)), optax.sgd(0.05, 0.9), seed=0
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 32).astype(np.int32)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    cfg = StepConfig(label_smoothing=0.0, mixup_alpha=0.0, autoaugment=False)
    step = jax.jit(functools.partial(train_step, cfg=cfg))

    def eval_loss(state) -> float:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        logits = predict(state.apply_fn, variables, images, 32)[0]
        return float(-np.mean(jax.nn.log_softmax(logits)[np.arange(32), labels]))

    before = eval_loss(state)
    losses = []
    for i in range(20):
        state, metrics = step(state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses
    assert eval_loss(state) < before - 0.05

"""Multi-host data parallelism, for real: two processes on loopback, two CPU devices each.

Both processes run the command a user runs on a pod (`--config.distributed=True`, the
coordinator in JAX_COORDINATOR_ADDRESS), joined by `jax.distributed` with CPU collectives
(gloo), training the tiny network's stage A over the 4 global devices. Each process builds
the global arrays from its own copy of the data, on its own devices only. Only process 0
writes metrics and TensorBoard files; the checkpoints are written once and both processes
restore them. The result equals one process training on 4 devices.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_run import TINY, main_command, main_env, stable, tiny_config

from micronet_jax import builders
from micronet_jax.models.efficientnet import init_variables
from micronet_jax.train import metrics as metrics_io
from micronet_jax.train.checkpoint import Checkpointer
from micronet_jax.train.loop import Schedule
from micronet_jax.train.optim import make_optimizer
from micronet_jax.train.state import create_train_state

pytestmark = pytest.mark.slow
EPOCHS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(workdir: Path, archive: Path, *extra: str) -> list[str]:
    """Stage A of the tiny network (AutoAugment off: it only lengthens the compiles here)."""
    options = (f"--config.train.epochs={EPOCHS}", "--config.data.autoaugment=False")
    return main_command(workdir, archive, *options, *extra, config=str(TINY))


def own_lines(output: str) -> list[str]:
    """What the program printed, without the collective library's connection notices."""
    return [line for line in output.splitlines() if not line.startswith("[Gloo]")]


def run_two_processes(workdir: Path, archive: Path, cache: Path) -> list[str]:
    """Both processes of one job; their stderr (each must exit 0)."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = main_env(cache)
        env.update(
            JAX_PLATFORMS="cpu",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(rank),
        )
        args = command(workdir, archive, "--config.distributed=True", "--config.cpu_devices=2")
        procs.append(
            subprocess.Popen(
                args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = []
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"process {rank}:\n{err[-4000:]}"
        outputs.append(out)
    return outputs


def run_one_process(workdir: Path, archive: Path, cache: Path) -> None:
    env = main_env(cache)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
    )
    done = subprocess.run(command(workdir, archive), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


def final_params(workdir: Path) -> list[np.ndarray]:
    """The last checkpoint's parameters, restored here on one device."""
    config = tiny_config()
    model = builders.model_from_config(config)
    tx = make_optimizer(config.train.lr, EPOCHS, Schedule(EPOCHS, 32, 160).steps_per_epoch)
    template = create_train_state(
        model.apply, init_variables(model, jax.random.key(0)), tx, config.seed
    )
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        state, _, step = ckpt.restore(template)
    finally:
        ckpt.close()
    assert step == EPOCHS * 5
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_two_processes_train_like_one_process_on_four_devices(
    tmp_path, tiny_archive, compile_cache
):
    multi, single = tmp_path / "two_processes", tmp_path / "one_process"
    outputs = run_two_processes(multi, tiny_archive, compile_cache)
    run_one_process(single, tiny_archive, compile_cache)

    # only process 0 speaks and writes; the banner counts the 4 global devices
    assert "devices: 4 × cpu (cpu) over 2 processes" in own_lines(outputs[0])[0]
    assert own_lines(outputs[1]) == []
    records = metrics_io.read_records(multi / "metrics.jsonl")
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    assert len(list(multi.glob("events.out.tfevents.*"))) == 1

    # the checkpoints: one folder per saved step, complete, no temporary leftovers
    steps = sorted((p.name for p in (multi / "checkpoints").iterdir()), key=int)
    assert steps == [str(5 * e) for e in range(1, EPOCHS + 1)], steps

    # the same training as one process with 4 devices
    got, want = final_params(multi), final_params(single)
    assert len(got) == len(want) > 20
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    single_records = stable(metrics_io.read_records(single / "metrics.jsonl"))
    for a, b in zip(stable(records), single_records, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-9)

    # a rerun resumes: both processes restore the last checkpoint and train nothing more
    before = (multi / "metrics.jsonl").read_text()
    run_two_processes(multi, tiny_archive, compile_cache)
    assert (multi / "metrics.jsonl").read_text() == before

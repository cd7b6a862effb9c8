"""Multi-host data parallelism, for real: two processes on loopback, two CPU devices each.

Both processes run the command a user runs on a pod (`--config.distributed=True`, the
coordinator in JAX_COORDINATOR_ADDRESS), joined by `jax.distributed` with CPU collectives
(gloo), training the tiny network's stage A over the 4 global devices. Each process builds
the global arrays from its own copy of the data, on its own devices only. Only process 0
writes metrics and TensorBoard files; the checkpoints are written once and both processes
restore them. The result equals one process training on 4 devices.

Then what goes wrong on a pod, each on the same two-process harness: a host killed in the
middle of training (the survivor ends itself with one line; a relaunch resumes exactly), a
preemption notice to every process or to one (all stop at one agreed step, save it, exit 0;
a relaunch resumes exactly), no coordinator or a missing peer (one line, exit 2, nothing
written), and processes started with different configs (refused, naming the key).

All of it runs on one worker (`xdist_group`): two jobs of two processes at once on two
cores would only slow each other down.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_run import TINY, main_command, main_env, stable, tiny_config, xla_flags

from micronet_jax.config import builders
from micronet_jax.models.efficientnet import init_variables
from micronet_jax.train import metrics as metrics_io
from micronet_jax.train.checkpoint import Checkpointer
from micronet_jax.train.loop import Schedule
from micronet_jax.train.optim import make_optimizer
from micronet_jax.train.state import create_train_state

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multihost")]
EPOCHS = 2
STEPS_PER_EPOCH = 5  # 160 images, batches of 32
TIMEOUT_S = 10  # --config.distributed_timeout_s of these runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(workdir: Path, archive: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    """Stage A of the tiny network (AutoAugment off: it only lengthens the compiles here)."""
    options = (f"--config.train.epochs={epochs}", "--config.data.autoaugment=False")
    return main_command(workdir, archive, *options, *extra, config=str(TINY))


RUNTIME_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")  # `W1203 12:00:00.000000 ...`
# gloo's connection notice, written piece by piece from several threads: two notices can
# interleave ("[Gloo] Rank [Gloo] Rank 3 is connected to 3 ... : 3", then "2 is connected
# to 3 ... : 3"), so a line made only of the notice's pieces is one.
GLOO_NOTICE = re.compile(
    r"(?:\[Gloo\] Rank |\d+| is connected to | peer ranks\. Expected number of connected peer"
    r" ranks is : )+"
)


ABSL_HEADER = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ (\S+):\d+\]")
# orbax's background save thread logs its own failure, traceback included, when the peer it
# waits on for a checkpoint's commit dies; that is the checkpointer's log, not the program's
CHECKPOINTER_LOGS = {"async_checkpointer.py", "future.py"}


def tracebacks_of_the_program(output: str) -> list[int]:
    """Line numbers of the tracebacks that no checkpointer log record introduced."""
    chained = ("During handling", "The above exception")
    found, source, in_traceback = [], None, False
    for number, line in enumerate(output.splitlines()):
        header = ABSL_HEADER.match(line)
        if header:
            source, in_traceback = header.group(1), False
        elif line.startswith("Traceback"):
            in_traceback = True
            if source not in CHECKPOINTER_LOGS:
                found.append(number)
        elif line.startswith(" ") or line.startswith(chained) or not line.strip():
            continue
        elif in_traceback:
            in_traceback = False  # the exception's own line closes the traceback
        else:
            source = None  # a line of the program's own ends the log record
    return found


def own_lines(output: str) -> list[str]:
    """What the program printed: no collective library's connection notices and no lines of
    the runtime's C++ log."""
    return [
        line
        for line in output.splitlines()
        if line.strip()
        and not RUNTIME_LOG.match(line)
        and not (GLOO_NOTICE.fullmatch(line) and not line.isdigit())
    ]


@dataclasses.dataclass
class Process:
    """One process of a job, its output going to files (so nothing blocks on a full pipe)."""

    rank: int
    popen: subprocess.Popen
    out: Path
    err: Path
    started: float
    ended: float | None = None

    def poll(self) -> int | None:
        code = self.popen.poll()
        if code is not None and self.ended is None:
            self.ended = time.monotonic()
        return code

    def wait(self, timeout: float = 900) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.popen.kill()
                raise AssertionError(f"process {self.rank} hung:\n{self.stderr()[-3000:]}")
            time.sleep(0.05)
        return self.popen.returncode

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def signal(self, signum: int) -> float:
        """Send `signum`; the moment it was sent."""
        self.popen.send_signal(signum)
        return time.monotonic()


def start(
    workdir: Path,
    archive: Path,
    cache: Path,
    ranks: tuple[int, ...] = (0, 1),
    extra: dict[int, tuple[str, ...]] | None = None,
    address: str | None = None,
    logs: Path | None = None,
    epochs: int = EPOCHS,
) -> list[Process]:
    """Start `ranks` of a 2-process job of stage A on `workdir` (`extra` options per rank)."""
    address = address or f"127.0.0.1:{free_port()}"
    logs = logs or workdir.parent
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for rank in ranks:
        env = main_env(cache)
        env.update(
            JAX_PLATFORMS="cpu",
            JAX_COORDINATOR_ADDRESS=address,
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(rank),
        )
        args = command(
            workdir,
            archive,
            "--config.distributed=True",
            "--config.cpu_devices=2",
            f"--config.distributed_timeout_s={TIMEOUT_S}",
            *(extra or {}).get(rank, ()),
            epochs=epochs,
        )
        out, err = logs / f"{workdir.name}.{rank}.out", logs / f"{workdir.name}.{rank}.err"
        with out.open("w") as stdout, err.open("w") as stderr:
            popen = subprocess.Popen(args, env=env, stdout=stdout, stderr=stderr, text=True)
        processes.append(Process(rank, popen, out, err, time.monotonic()))
    return processes


def run_two_processes(workdir: Path, archive: Path, cache: Path) -> list[Process]:
    """Both processes of one job, to the end; each must exit 0."""
    processes = start(workdir, archive, cache)
    for p in processes:
        assert p.wait() == 0, f"process {p.rank}:\n{p.stderr()[-4000:]}"
    return processes


def run_one_process(workdir: Path, archive: Path, cache: Path) -> None:
    env = main_env(cache)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"),
    )
    done = subprocess.run(command(workdir, archive), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


def wait_for(condition, what: str, processes: list[Process], timeout: float = 600) -> None:
    """Poll `condition()` until it holds; fail if a process ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        for p in processes:
            if p.poll() is not None:
                raise AssertionError(
                    f"process {p.rank} ended (status {p.popen.returncode}) before {what}:\n"
                    + p.stderr()[-3000:]
                )
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.02)


def training_started(process: Process) -> bool:
    """The banner's last line is out: the job is joined and the stage about to compile."""
    return "workdir:" in process.stdout()


def final_state(workdir: Path, step: int | None = None):
    """A checkpoint's state (the last one by default), restored here on one device."""
    config = tiny_config()
    model = builders.model_from_config(config)
    tx = make_optimizer(config.train.lr, EPOCHS, Schedule(EPOCHS, 32, 160).steps_per_epoch)
    template = create_train_state(
        model.apply, init_variables(model, jax.random.key(0)), tx, config.seed
    )
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        state, _, restored = ckpt.restore(template, step)
    finally:
        ckpt.close()
    return state, restored


def final_params(workdir: Path) -> list[np.ndarray]:
    state, step = final_state(workdir)
    assert step == EPOCHS * STEPS_PER_EPOCH
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def checkpoint_steps(workdir: Path) -> list[str]:
    """Every entry of the checkpoint folder (a temporary leftover would show here)."""
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def assert_resumed_exactly(workdir: Path, reference: Path) -> None:
    """A relaunched run ends as the uninterrupted one: parameters to 1e-5, metrics lines
    equal (but for wall time and speed)."""
    got, want = final_params(workdir), final_params(reference)
    assert len(got) == len(want) > 20
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    records = stable(metrics_io.read_records(workdir / "metrics.jsonl"))
    assert records == stable(metrics_io.read_records(reference / "metrics.jsonl"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_archive, compile_cache) -> Path:
    """An uninterrupted two-process run: what every interrupted one must end as."""
    workdir = tmp_path_factory.mktemp("multihost") / "uninterrupted"
    run_two_processes(workdir, tiny_archive, compile_cache)
    return workdir


def test_two_processes_train_like_one_process_on_four_devices(
    reference, tmp_path, tiny_archive, compile_cache
):
    outputs = [reference.parent / f"{reference.name}.{rank}.out" for rank in (0, 1)]
    single = tmp_path / "one_process"
    run_one_process(single, tiny_archive, compile_cache)

    # only process 0 speaks and writes; the banner counts the 4 global devices
    assert "devices: 4 × cpu (cpu) over 2 processes" in own_lines(outputs[0].read_text())[0]
    assert own_lines(outputs[1].read_text()) == []
    records = metrics_io.read_records(reference / "metrics.jsonl")
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    assert len(list(reference.glob("events.out.tfevents.*"))) == 1

    # the checkpoints: one folder per saved step, complete, no temporary leftovers
    steps = [str(STEPS_PER_EPOCH * e) for e in range(1, EPOCHS + 1)]
    assert checkpoint_steps(reference) == sorted(steps)

    # the same training as one process with 4 devices
    got, want = final_params(reference), final_params(single)
    assert len(got) == len(want) > 20
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    single_records = stable(metrics_io.read_records(single / "metrics.jsonl"))
    for a, b in zip(stable(records), single_records, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-9)


def test_a_lost_host_ends_the_survivor_and_a_relaunch_resumes_exactly(
    reference, tmp_path, tiny_archive, compile_cache
):
    workdir = tmp_path / "run"
    processes = start(workdir, tiny_archive, compile_cache)
    first = workdir / "checkpoints" / str(STEPS_PER_EPOCH)
    wait_for(first.exists, "the first checkpoint", processes)
    killed = processes[1].signal(signal.SIGKILL)

    survivor = processes[0]
    assert survivor.wait(timeout=120) != 0
    seconds = survivor.ended - killed
    assert seconds < 3 * TIMEOUT_S, seconds  # the watch's timeout, not the runtime's
    lines = own_lines(survivor.stderr())
    assert tracebacks_of_the_program(survivor.stderr()) == [], survivor.stderr()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: lost process 1 of 2"), lines
    print(f"survivor ended {seconds:.1f} s after process 1 was killed: {errors[0]}")

    # nothing half-written is listed: the newest listed checkpoint restores
    listed = [s for s in checkpoint_steps(workdir) if s.isdigit()]
    _, restored = final_state(workdir, step=None)
    assert str(restored) == max(listed, key=int)

    for p in start(workdir, tiny_archive, compile_cache):
        assert p.wait() == 0, p.stderr()[-3000:]
    assert_resumed_exactly(workdir, reference)


def preempted_line(process: Process) -> tuple[int, str]:
    """The process's one 'interrupted: preemption notice' line and the step it names."""
    lines = [line for line in own_lines(process.stderr()) if "preemption notice" in line]
    assert len(lines) == 1, process.stderr()[-3000:]
    step = int(re.search(r"stopped at step (\d+)", lines[0]).group(1))
    return step, lines[0]


def assert_stopped_together(processes: list[Process], workdir: Path, sent: float) -> int:
    """Every process exited 0 naming the same step, whose checkpoint is complete; the step."""
    for p in processes:
        assert p.wait(timeout=300) == 0, f"process {p.rank}:\n{p.stderr()[-3000:]}"
    steps = {p.rank: preempted_line(p)[0] for p in processes}
    seconds = max(p.ended for p in processes) - sent
    print(f"both stopped at steps {steps}, {seconds:.1f} s after the first SIGTERM")
    assert steps[0] == steps[1], steps
    step = steps[0]
    line = preempted_line(processes[0])[1]
    assert f"saved checkpoint {workdir / 'checkpoints'}/{step}" in line
    assert "rerun the same command on every host to resume" in line

    # one checkpoint of the agreed step, complete (it restores), nothing after it
    assert str(step) in checkpoint_steps(workdir)
    assert all(s.isdigit() and int(s) <= step for s in checkpoint_steps(workdir))
    _, restored = final_state(workdir, step=step)
    assert restored == step
    return step


def test_a_preemption_notice_to_every_process_stops_all_at_one_step_and_resumes_exactly(
    reference, tmp_path, tiny_archive, compile_cache
):
    """SIGTERM to both while they compile: they agree on the first boundary after it."""
    workdir = tmp_path / "run"
    processes = start(workdir, tiny_archive, compile_cache)
    wait_for(lambda: training_started(processes[0]), "the banner", processes)
    sent = min(p.signal(signal.SIGTERM) for p in processes)
    step = assert_stopped_together(processes, workdir, sent)
    assert step < EPOCHS * STEPS_PER_EPOCH

    for p in start(workdir, tiny_archive, compile_cache):  # the same command again
        assert p.wait() == 0, p.stderr()[-3000:]
    assert_resumed_exactly(workdir, reference)


def test_a_preemption_notice_to_one_process_stops_all_at_one_step(
    tmp_path, tiny_archive, compile_cache
):
    """SIGTERM to process 1 alone, in the middle of training (after the first checkpoint): the
    notice reaches process 0 through the job and both stop at the same later step. Twice the
    epochs, so that the run cannot end before the notice has gone round."""
    workdir = tmp_path / "run"
    epochs = 2 * EPOCHS
    processes = start(workdir, tiny_archive, compile_cache, epochs=epochs)
    first = workdir / "checkpoints" / str(STEPS_PER_EPOCH)
    wait_for(first.exists, "the first checkpoint", processes)
    sent = processes[1].signal(signal.SIGTERM)
    step = assert_stopped_together(processes, workdir, sent)
    assert STEPS_PER_EPOCH < step < epochs * STEPS_PER_EPOCH


def test_no_coordinator_or_a_missing_peer_is_one_line_and_status_2(
    tmp_path, tiny_archive, compile_cache
):
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    alone = {
        "wrong_address": start(
            tmp_path / "wrong_address", tiny_archive, compile_cache, (1,), address=nobody
        )[0],
        "missing_peer": start(tmp_path / "missing_peer", tiny_archive, compile_cache, (0,))[0],
    }
    for name, p in alone.items():
        assert p.wait(timeout=120) == 2, p.stderr()[-3000:]
        lines = own_lines(p.stderr())
        assert len(lines) == 1, lines
        print(f"{name}: exit 2 after {p.ended - p.started:.1f} s (timeout {TIMEOUT_S} s)")
        assert not (tmp_path / name).exists()  # nothing written
    assert alone["wrong_address"].stderr().count(f"reached no coordinator at {nobody}") == 1
    assert "not every process joined" in alone["missing_peer"].stderr()
    assert f"within {TIMEOUT_S} s" in own_lines(alone["missing_peer"].stderr())[0]


def test_processes_started_with_different_configs_are_refused(
    tmp_path, tiny_archive, compile_cache
):
    workdir = tmp_path / "run"
    processes = start(
        workdir,
        tiny_archive,
        compile_cache,
        extra={1: ("--config.train.batch_size=16",)},
    )
    for p in processes:
        assert p.wait(timeout=300) == 2, p.stderr()[-3000:]
        lines = own_lines(p.stderr())
        assert len(lines) == 1 and lines[0].startswith("error: process"), lines
        assert "train.batch_size: 32 vs 16" in lines[0] or "train.batch_size: 16 vs 32" in lines[0]
    assert not workdir.exists()  # refused before anything was written

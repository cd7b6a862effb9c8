"""Starting and leaving a multi-host job (`config.distributed`).

Joining is bounded: a process that cannot reach the coordinator, or a coordinator whose peers
do not all arrive, ends within `config.distributed_timeout_s` with one line and status 2,
before anything is written. Once joined, every process compares its config with every other's
and refuses to start on a difference, naming the key (different batch sizes or evaluation
intervals would leave them waiting in different collectives). A `PeerWatch` then watches the
peers for the rest of the run, and `Job.leave` waits for all of them at the end so that none
mistakes another's normal exit for a loss. The runtime's own timeouts are set beyond ours, so
that a failure reads as our one line and not as its abort.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from micronet_jax.config.workdir import differences, flatten
from micronet_jax.distributed.watchdog import Deadline, PeerWatch
from micronet_jax.errors import BAD_INPUT, LaunchError

CONFIG_PREFIX = "micronet/config/"
FINISHED_BARRIER = "micronet/finished"
# Keys that may differ between processes: paths on each host's own disk.
HOST_LOCAL_KEYS = ("data.dir", "compilation_cache")


@dataclasses.dataclass
class Job:
    """A joined job: this process's place in it and the watch over its peers."""

    process_id: int
    num_processes: int
    timeout: float
    watch: PeerWatch | None = None

    def explain_failure(self) -> None:
        """A collective failed (gloo's error names only a socket): give the watch the time it
        needs to name the lost process; it ends this process when it does."""
        if self.watch is not None:
            self.watch.wait_for_loss()

    def leave(self, finished: bool) -> None:
        """Stop watching. After a run that `finished` (or stopped together), first wait until
        every process is done, so that none stops beating while a peer still watches it."""
        if self.watch is None:
            return
        if finished:
            client = _client()
            client.wait_at_barrier(FINISHED_BARRIER, int(self.timeout * 1000))
        self.watch.stop()
        self.watch = None


def _client() -> Any:
    """The job's key-value store: jax's distributed client (as orbax reads it)."""
    import orbax.checkpoint as ocp

    return ocp.multihost.get_jax_distributed_client()


def _join_arguments() -> dict[str, Any]:
    """Coordinator, process count and id from the environment (else JAX detects them on TPU
    pods and SLURM / Open MPI clusters)."""
    env = os.environ
    kwargs: dict[str, Any] = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    if env.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    return kwargs


def _join_failure(kwargs: dict[str, Any], timeout: float) -> str:
    address = kwargs.get("coordinator_address", "the detected coordinator")
    who = kwargs.get("process_id")
    n = kwargs.get("num_processes")
    of = f" of {n}" if n is not None else ""
    if who == 0:
        return (
            f"could not start the multi-host job within {timeout:g} s: process 0{of} serves "
            f"the coordinator at {address} but not every process joined it; start the same "
            "command on every host (or raise --config.distributed_timeout_s)"
        )
    me = f"process {who}{of}" if who is not None else "this process"
    return (
        f"could not join the multi-host job within {timeout:g} s: {me} reached no "
        f"coordinator at {address} (JAX_COORDINATOR_ADDRESS), or process 0 has not started; "
        "check the address and start the same command on every host"
    )


def join(config: Any) -> Job | None:
    """Join the job when `config.distributed` (None otherwise); bounded by
    `config.distributed_timeout_s`. Must come before any other JAX call."""
    if not config.distributed:
        return None
    timeout = config.distributed_timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise LaunchError(f"distributed_timeout_s must be positive, got {timeout!r}")
    kwargs = _join_arguments()
    if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    runtime_timeout = int(2 * timeout + 10)  # the runtime's checks only back ours up
    with Deadline(timeout, _join_failure(kwargs, timeout), BAD_INPUT):
        jax.distributed.initialize(
            **kwargs,
            initialization_timeout=runtime_timeout,
            heartbeat_timeout_seconds=runtime_timeout,
            shutdown_timeout_seconds=int(timeout),
        )
    job = Job(jax.process_index(), jax.process_count(), float(timeout))
    job.watch = PeerWatch(_client(), job.process_id, job.num_processes, timeout).start()
    return job


def launch_record(config: Any, workdir: str | None) -> dict[str, Any]:
    """What must be the same in every process: the whole config but host-local paths, and
    the workdir."""
    record = flatten(json.loads(config.to_json()))
    for key in HOST_LOCAL_KEYS:
        record.pop(key, None)
    record["--workdir"] = workdir
    return record


def check_same_launch(job: Job | None, config: Any, workdir: str | None) -> None:
    """Every process publishes its launch record and reads every other's; any difference is
    a LaunchError naming the keys, raised in every process before the first step."""
    if job is None:
        return
    client = _client()
    mine = launch_record(config, workdir)
    client.key_value_set(f"{CONFIG_PREFIX}{job.process_id}", json.dumps(mine, sort_keys=True))
    for peer in range(job.num_processes):
        if peer == job.process_id:
            continue
        try:
            text = client.blocking_key_value_get(f"{CONFIG_PREFIX}{peer}", int(job.timeout * 1000))
        except Exception as exc:  # noqa: BLE001 - the runtime raises its own error types
            raise LaunchError(
                f"process {peer} did not send its config within {job.timeout:g} s ({exc})"
            ) from None
        theirs = json.loads(text)
        diffs = differences(theirs, mine, joiner=" vs ")
        if diffs:
            raise LaunchError(
                f"process {job.process_id} was started with another config than process "
                f"{peer}; differing keys (process {peer} vs process {job.process_id}): "
                + "; ".join(diffs)
                + ". Start every process with the same command"
            )

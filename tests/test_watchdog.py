"""The watchdogs and launch checks of a multi-host job, on their own (no second process).

`tests/test_multihost.py` runs them for real (a killed host, a wrong coordinator address,
processes with different configs); here each rule is checked in isolation and in a fraction of
a second: a peer whose heartbeat stops is named, a silent coordinator is named, a live job is
left alone, a deadline fires only when its block overruns, and launch records differ exactly
where the configs do.
"""

from __future__ import annotations

import threading
import time

import pytest
from tiny_run import tiny_config

from micronet_jax.config.workdir import differences
from micronet_jax.distributed.watchdog import HEARTBEAT_PREFIX, Deadline, PeerWatch
from micronet_jax.recipe.launch import HOST_LOCAL_KEYS, launch_record


class Store:
    """An in-memory key-value store shared by the watches of one simulated job."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.lock = threading.Lock()
        self.down = False  # the coordinator's store stops answering

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        if self.down:
            raise ConnectionError("coordinator unreachable")
        with self.lock:
            assert allow_overwrite or key not in self.values
            self.values[key] = value

    def key_value_dir_get(self, key: str) -> list[tuple[str, str]]:
        if self.down:
            raise ConnectionError("coordinator unreachable")
        with self.lock:
            return [(k, v) for k, v in self.values.items() if k.startswith(key)]


class Verdicts:
    """Collects what a watch would have ended its process with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.event = threading.Event()

    def __call__(self, message: str, status: int) -> None:
        self.calls.append((message, status))
        self.event.set()


def watches(store: Store, n: int, timeout: float = 1.5) -> list[tuple[PeerWatch, Verdicts]]:
    result = []
    for pid in range(n):
        verdicts = Verdicts()
        watch = PeerWatch(store, pid, n, timeout, interval=0.05, on_lost=verdicts)
        result.append((watch.start(), verdicts))
    return result


def test_a_live_job_is_left_alone_and_its_heartbeats_are_in_the_store():
    """Beating every 0.05 s, no peer goes 3 s without a beat, even with both cores busy
    (a starved thread is late by scheduling slices, not seconds)."""
    store = Store()
    job = watches(store, 3, timeout=3.0)
    time.sleep(3.5)  # past the timeout: every peer kept beating
    for watch, verdicts in job:
        watch.stop()
        assert verdicts.calls == []
        assert watch.lost() is None
    assert sorted(store.values) == [f"{HEARTBEAT_PREFIX}{p}" for p in range(3)]


def test_a_peer_that_stops_beating_is_named_by_the_others():
    store = Store()
    job = watches(store, 3)
    time.sleep(0.3)
    job[2][0].stop()  # process 2's host dies: its count stops moving
    for watch, verdicts in job[:2]:
        assert verdicts.event.wait(15)
        message, status = verdicts.calls[0]
        assert message.startswith("lost process 2 of 3: no heartbeat for")
        assert "rerun the same command on every host to resume" in message
        assert status == 1
        watch.stop()


def test_a_silent_coordinator_is_named_by_the_other_processes():
    store = Store()
    job = watches(store, 2)
    time.sleep(0.3)
    store.down = True
    watch, verdicts = job[1]
    assert verdicts.event.wait(15)
    assert verdicts.calls[0][0].startswith("lost process 0 of 2 (the coordinator)")
    for watch, _ in job:
        watch.stop()


def test_wait_for_loss_returns_when_the_watch_names_a_peer():
    store = Store()
    job = watches(store, 2)
    job[1][0].stop()
    watch, verdicts = job[0]
    assert watch.wait_for_loss()
    assert verdicts.calls and "lost process 1 of 2" in verdicts.calls[0][0]
    watch.stop()


def test_a_deadline_fires_only_when_its_block_overruns():
    fired = Verdicts()
    with Deadline(2.0, "too slow", 2, on_expiry=fired):  # a block of 0.05 s, late or not
        time.sleep(0.05)
    time.sleep(2.3)
    assert fired.calls == []
    with Deadline(0.1, "too slow", 2, on_expiry=fired):
        assert fired.event.wait(5)
    assert fired.calls == [("too slow", 2)]


def test_launch_records_differ_exactly_where_the_configs_do():
    one, other = tiny_config(), tiny_config()
    assert differences(launch_record(other, "w"), launch_record(one, "w"), " vs ") == []
    other.train.batch_size = 16
    other.data.dir = "/elsewhere/cifar"  # a host-local path may differ
    assert "data.dir" in HOST_LOCAL_KEYS
    diffs = differences(launch_record(one, "w"), launch_record(other, "w"), " vs ")
    assert diffs == ["train.batch_size: 32 vs 16"]
    assert differences(launch_record(one, "v"), launch_record(one, "w"), " vs ") == [
        "--workdir: 'v' vs 'w'"
    ]


@pytest.mark.parametrize("timeout", [0, -1, True])
def test_a_distributed_timeout_must_be_positive(timeout):
    from micronet_jax.errors import LaunchError
    from micronet_jax.recipe.launch import join

    config = tiny_config()
    config.distributed = True
    config.distributed_timeout_s = timeout
    with pytest.raises(LaunchError, match="distributed_timeout_s must be positive"):
        join(config)


def test_ctrl_c_in_a_job_of_several_processes_becomes_a_preemption_notice():
    """AgreedStop passes SIGINT on as SIGTERM, which jax's preemption service listens for
    (here a stand-in handler takes its place), and puts SIGINT's handler back on exit."""
    import os
    import signal

    from micronet_jax.distributed.preemption import AgreedStop

    noticed = []
    before_int = signal.getsignal(signal.SIGINT)
    before_term = signal.signal(signal.SIGTERM, lambda signum, frame: noticed.append(signum))
    try:
        with AgreedStop():
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 5
            while not noticed and time.monotonic() < deadline:
                time.sleep(0.01)
        assert noticed == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is before_int
    finally:
        signal.signal(signal.SIGTERM, before_term)

"""Watchdogs of a multi-host job: a deadline for joining it, and heartbeats between its processes.

A process blocked in a collective cannot notice that a peer has died: gloo waits on its
socket, and the distributed runtime's own heartbeat check ends the survivors with a
multi-line abort and a stack trace. These watchdogs run in threads of their own; the runtime's
timeouts are set beyond theirs, so they fire first and end the process with one line and a
status of their own. Ending the process (not raising) is the point: the main thread may be
stuck inside a collective that no exception can reach.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn, Protocol

LOST_PEER_STATUS = 1  # the run failed; rerunning the same command resumes it
HEARTBEAT_PREFIX = "micronet/alive/"


def end_process(message: str, status: int) -> NoReturn:
    """Print `error: message` and end the process at once with `status` (no cleanup: the
    main thread may be blocked in a collective, and a checkpoint in the making is left as
    orbax's temporary folder, which no restore lists)."""
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(status)


class Deadline:
    """Context manager: unless its block ends within `seconds`, the process ends with
    `message` and `status` (for calls that block in C++, like joining a job)."""

    def __init__(
        self,
        seconds: float,
        message: str,
        status: int,
        on_expiry: Callable[[str, int], Any] = end_process,
    ):
        self._timer = threading.Timer(seconds, on_expiry, (message, status))
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()


class KeyValueStore(Protocol):
    """What the watch needs of the job's key-value store (jax's distributed client)."""

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None: ...

    def key_value_dir_get(self, key: str) -> list[tuple[str, str]]: ...


class PeerWatch:
    """Heartbeats through the job's key-value store (served by process 0's coordinator).

    Every `interval` seconds a thread writes this process's beat count under its own key and
    reads everyone's. A peer whose count has not moved for `timeout` seconds is lost (its host
    died, was killed or is cut off); so is the coordinator, process 0, when the store has not
    answered for that long. A second thread checks these times (so a store call that hangs
    cannot hang the check) and calls `on_lost(message, status)`, by default ending the process.
    """

    def __init__(
        self,
        store: KeyValueStore,
        process_id: int,
        num_processes: int,
        timeout: float,
        interval: float | None = None,
        on_lost: Callable[[str, int], Any] = end_process,
    ):
        self.store = store
        self.process_id = process_id
        self.num_processes = num_processes
        self.timeout = float(timeout)
        self.interval = interval if interval is not None else max(0.2, min(2.0, timeout / 10))
        self.on_lost = on_lost
        now = time.monotonic()
        self._seen = {p: (None, now) for p in range(num_processes) if p != process_id}
        self._answered = now
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._fired = threading.Event()
        self._threads = [
            threading.Thread(target=self._beat, name="peer-heartbeat", daemon=True),
            threading.Thread(target=self._check, name="peer-watchdog", daemon=True),
        ]

    def start(self) -> PeerWatch:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and watching (before leaving the job on purpose)."""
        self._stop.set()
        for thread in self._threads:
            if thread is not threading.current_thread() and thread.is_alive():
                thread.join(timeout=2 * self.interval + 1)

    def _beat(self) -> None:
        count = 0
        while not self._stop.is_set():
            count += 1
            try:
                self.store.key_value_set(
                    f"{HEARTBEAT_PREFIX}{self.process_id}", str(count), allow_overwrite=True
                )
                entries = self.store.key_value_dir_get(HEARTBEAT_PREFIX)
            except Exception:  # noqa: BLE001 - an unreachable store is judged by the checker
                entries = None
            if entries is not None:
                self._record(entries)
            self._stop.wait(self.interval)

    def _record(self, entries: list[tuple[str, str]]) -> None:
        now = time.monotonic()
        with self._lock:
            self._answered = now
            for key, value in entries:
                peer = int(key.rstrip("/").rsplit("/", 1)[-1])
                if peer in self._seen and self._seen[peer][0] != value:
                    self._seen[peer] = (value, now)

    def lost(self) -> str | None:
        """Why the job is broken (a message naming the lost process), or None."""
        now = time.monotonic()
        with self._lock:
            silent = now - self._answered
            stale = {p: now - t for p, (_, t) in self._seen.items()}
        n = self.num_processes
        # The coordinator's count stops a beat before its store does: a stale process 0
        # whose store has stopped answering too is the coordinator lost, not a peer.
        coordinator_stale = stale.get(0, 0.0) > self.timeout and silent > 2 * self.interval
        if self.process_id != 0 and (silent > self.timeout or coordinator_stale):
            return (
                f"lost process 0 of {n} (the coordinator): its key-value store has not "
                f"answered for {silent:.0f} s and its heartbeat stopped "
                f"{stale.get(0, silent):.0f} s ago; its host died, was killed or is unreachable"
            )
        for peer, seconds in sorted(stale.items()):
            if seconds > self.timeout:
                return (
                    f"lost process {peer} of {n}: no heartbeat for {seconds:.0f} s; its host "
                    "died, was killed or is unreachable"
                )
        return None

    def wait_for_loss(self) -> bool:
        """Block until the watch has handled a lost peer (by default it ends the process, so
        this never returns then) or `timeout` and two checks have passed without one (False).
        For a collective that failed: its error names a socket, the watch names the process."""
        return self._fired.wait(self.timeout + 2 * self.interval + 1)

    def _check(self) -> None:
        while not self._stop.wait(self.interval):
            why = self.lost()
            if why is not None:
                self._stop.set()
                self.on_lost(
                    f"{why}. This process stops too; the last complete checkpoint is kept: "
                    "rerun the same command on every host to resume from it",
                    LOST_PEER_STATUS,
                )
                self._fired.set()  # only reached when on_lost returns (not end_process)
                return

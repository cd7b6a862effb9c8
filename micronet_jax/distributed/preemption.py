"""Stopping a multi-host job together: at the dispatch boundary every process agrees on.

A process that stops on its own leaves the others waiting in their next collective, and two
processes that stop at different steps write two different checkpoints. So in a job of several
processes SIGTERM (how TPU VMs and most schedulers announce a preemption) is left to JAX's
preemption service: `jax.distributed` installs its handler, tells every process of a notice
any one of them gets, and agrees on the step after the furthest one
(`multihost_utils.reached_preemption_sync_point`). Every process asks at every dispatch
boundary, with a count of boundaries that advances in step on every process (they all run the
same boundaries, from the same checkpoint), so the agreed count is one boundary, the same
global step everywhere. SIGINT (Ctrl-C) is turned into such a notice.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
from typing import Any

from jax.experimental import multihost_utils

# Boundaries asked about so far in this process. Process-wide, like the preemption service
# it speaks to: the count goes on across the stages of a pipeline, so a notice that arrives
# between two stages stops the next one at its first boundary.
_BOUNDARIES = itertools.count()


class AgreedStop:
    """Context manager with the interface of `guard.StopSignals`, for a job of several
    processes: `should_stop()` is True at the one boundary all processes agreed on after a
    preemption notice (SIGTERM to any of them, or SIGINT, which is passed on as SIGTERM)."""

    signum = None  # the notice's signal is handled by the runtime, which does not say which
    agreed = True  # every process stops at the same step

    def __init__(self) -> None:
        self.stopped = False
        self._previous: Any = None

    def _forward(self, signum: int, frame: Any) -> None:
        del signum, frame
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGTERM)  # the runtime's handler turns it into a notice

    def __enter__(self) -> AgreedStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._forward)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def should_stop(self) -> bool:
        """Ask the preemption service at this boundary (every process must ask at each)."""
        if not self.stopped:
            self.stopped = multihost_utils.reached_preemption_sync_point(next(_BOUNDARIES))
        return self.stopped

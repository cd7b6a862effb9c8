"""Run-time guards of the training loop: non-finite steps and stop signals.

`GuardedStep` wraps a step so that a step whose loss or new parameters are not finite
leaves the state as it was (only the step counter moves on, so every later batch keeps its
key) and reports `ok=False`; the loop reads the flags on the host every few steps and
either stops (`nan_policy='stop'`) or counts the skipped steps (`'skip'`). Because a bad
update is never applied, a bad state can never be checkpointed.

`StopSignals` turns SIGINT/SIGTERM into a flag the loop polls at step boundaries, so it
can save a checkpoint and exit cleanly with status 128 + signal number (130 / 143).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from micronet_jax.errors import MicronetError

log = logging.getLogger(__name__)

NAN_POLICIES = ("stop", "skip")


class NonFiniteError(MicronetError):
    """Training met a NaN/Inf loss or parameter and `nan_policy` is 'stop'."""

    exit_status = 1  # the run failed; its input was fine


class Interrupted(MicronetError):
    """A stop signal arrived; a checkpoint was saved. `exit_code` is 128 + signal number, or
    0 for a preemption notice that every process of a multi-host job stopped at together."""

    def __init__(self, message: str, signum: int | None):
        super().__init__(message)
        self.exit_code = 0 if signum is None else 128 + int(signum)

    @property
    def exit_status(self) -> int:  # type: ignore[override]
        return self.exit_code


def all_finite(tree: Any) -> jax.Array:
    """One device bool: every floating leaf of `tree` is finite."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


@dataclasses.dataclass(frozen=True)
class GuardedStep:
    """A step that refuses non-finite updates. Hashable by value, so equal wrappers of one
    step share a compiled program. `inject_nan_step` >= 0 makes that global step's loss NaN
    (a fault-injection hook for tests)."""

    step_fn: Callable
    inject_nan_step: int = -1

    def __call__(self, state: Any, batch: dict, key: jax.Array) -> tuple[Any, dict]:
        new_state, metrics = self.step_fn(state, batch, key)
        loss = metrics["loss"]
        if self.inject_nan_step >= 0:
            loss = jnp.where(state.step == self.inject_nan_step, jnp.nan, loss)
        ok = jnp.isfinite(loss) & all_finite(new_state.params)
        kept = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new_state, state)
        kept = kept.replace(step=state.step + 1)
        metrics = {name: jnp.where(ok, value, 0.0) for name, value in metrics.items()}
        metrics["loss"] = jnp.where(ok, loss, 0.0)
        metrics["ok"] = ok
        return kept, metrics


class StopSignals:
    """Context manager: while active, SIGINT/SIGTERM set `signum` instead of killing.

    A second signal of the same kind restores the default behaviour (a second Ctrl-C
    interrupts at once). Outside the main thread it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.signum is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    agreed = False  # a stop of this process alone (see preemption.AgreedStop for a job's)

    def should_stop(self) -> bool:
        """Asked at every dispatch boundary: has a signal arrived?"""
        return self.requested


@dataclasses.dataclass
class EpochProgress:
    """Running sums of one epoch, so a checkpoint taken mid-epoch resumes its averages exactly.

    Steps are dispatched one at a time or K at a time (`add(..., steps=K)` with metrics
    stacked along a leading axis of K). Their metrics stay on the device in `pending` until
    `flush` reads them in one transfer and folds the finite steps, in step order, into
    float64 sums weighted by batch size; so the averages do not depend on how the steps were
    grouped, nor on where a run was interrupted.
    """

    epoch: int
    first_step: int  # global step of the epoch's first batch
    index: int = 0  # batches of the epoch dispatched
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    weight: float = 0.0
    skipped: int = 0
    # (global step of the first, batch size, number of steps, metrics on the device)
    pending: list[tuple[int, int, int, dict[str, Any]]] = dataclasses.field(default_factory=list)
    latest: dict[str, float] = dataclasses.field(default_factory=dict)  # last finite step read

    def add(self, metrics: dict[str, jax.Array], size: int, steps: int = 1) -> None:
        """Record `steps` dispatched steps of batch `size` (no device sync)."""
        self.pending.append((self.first_step + self.index, size, steps, metrics))
        self.index += steps

    @property
    def pending_steps(self) -> int:
        return sum(steps for _, _, steps, _ in self.pending)

    def flush(self, lag: int = 0) -> list[int]:
        """Read the pending metrics but the newest `lag` dispatches (one host transfer); fold
        the finite steps into the sums; return the global steps that were not finite."""
        ready = self.pending[: len(self.pending) - lag] if lag else list(self.pending)
        if not ready:
            return []
        values = jax.device_get([metrics for *_, metrics in ready])
        bad = []
        for (first, size, steps, _), metrics in zip(ready, values, strict=True):
            rows = {name: np.asarray(v).reshape(steps) for name, v in metrics.items()}
            ok = rows.pop("ok", np.ones(steps, bool))
            for j in range(steps):
                if not ok[j]:
                    bad.append(first + j)
                    continue
                for name, column in rows.items():
                    self.sums[name] = self.sums.get(name, 0.0) + float(column[j]) * size
                self.weight += size
                self.latest = {name: float(column[j]) for name, column in rows.items()}
        del self.pending[: len(ready)]
        return bad

    def averages(self) -> dict[str, float]:
        if self.pending:
            raise RuntimeError("flush the pending metrics before averaging")
        if self.weight == 0:
            return {name: float("nan") for name in self.sums}
        return {name: value / self.weight for name, value in self.sums.items()}

    def to_json(self) -> dict[str, Any]:
        if self.pending:
            raise RuntimeError("flush the pending metrics before saving")
        return {
            "epoch": self.epoch,
            "index": self.index,
            "sums": dict(self.sums),
            "weight": self.weight,
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], first_step: int) -> EpochProgress:
        return cls(
            epoch=int(data["epoch"]),
            first_step=first_step,
            index=int(data["index"]),
            sums={name: float(value) for name, value in data["sums"].items()},
            weight=float(data["weight"]),
            skipped=int(data["skipped"]),
        )


@dataclasses.dataclass
class Watch:
    """Polled by the loop at every dispatch boundary: reads the metrics and finiteness flags
    once `check_every` steps are pending (leaving the newest dispatch in flight, so the
    device never waits for the host) and notices stop signals."""

    policy: str
    check_every: int
    signals: Any  # StopSignals, or preemption.AgreedStop in a job of several processes
    stage: str
    steps_per_epoch: int

    def check(self, progress: EpochProgress, lag: int = 0) -> None:
        """Read pending flags; raise NonFiniteError ('stop') or count skipped steps ('skip')."""
        bad = progress.flush(lag)
        if not bad:
            return
        first = bad[0]
        epoch, index = divmod(first, self.steps_per_epoch)
        where = (
            f"stage {self.stage}, epoch {epoch + 1}, step {index + 1} of {self.steps_per_epoch} "
            f"(global step {first})"
        )
        if self.policy == "stop":
            raise NonFiniteError(
                f"non-finite loss or parameters in {where}; training stopped and the update "
                "was not applied, so the last checkpoint is untouched "
                "(train.nan_policy='skip' skips such batches instead)"
            )
        progress.skipped += len(bad)
        log.warning("skipped %d non-finite step(s), the first in %s", len(bad), where)

    def due(self, progress: EpochProgress) -> bool:
        return progress.pending_steps >= self.check_every and len(progress.pending) > 1

    def __call__(self, progress: EpochProgress) -> bool:
        """True when the loop should stop at this boundary (a signal arrived)."""
        if self.due(progress):
            self.check(progress, lag=1)
        return self.signals.should_stop()

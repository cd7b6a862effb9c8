"""What a training stage shows while it runs: one progress bar and a line per event.

The bar reads "stage 3/15 prune_02" and its postfix carries the latest step's loss and
learning rate, the measured images/s and an estimate of the whole run's remaining time
(this stage's steps plus every later stage's, at the measured time per step). Evaluations
and the end of a stage are one line each, printed above the bar. Timing is taken between
host reads of the metrics, which wait for the device, so it measures the device's pace.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

SMOOTHING = 0.3  # weight of the newest reading in the running step time


def format_duration(seconds: float) -> str:
    """H:MM:SS (days as "Nd H:MM:SS")."""
    seconds = max(0, int(round(seconds)))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    clock = f"{hours}:{minutes:02d}:{seconds:02d}"
    return f"{days}d {clock}" if days else clock


@dataclasses.dataclass
class StageBar:
    """Progress of one stage: `advance` after each dispatch, `observe` after each host read."""

    desc: str
    total: int  # steps of this stage
    initial: int = 0  # steps already done (a resumed stage)
    later_steps: int = 0  # steps of the stages after this one, for the overall estimate
    enabled: bool = True  # False: no bar, lines only
    quiet: bool = False  # True: nothing at all (processes other than the first)
    clock: Callable[[], float] = time.perf_counter  # what the pace is measured by
    done: int = dataclasses.field(init=False)
    seconds_per_step: float | None = dataclasses.field(default=None, init=False)

    def __post_init__(self) -> None:
        self.done = self.initial
        self._bar: Any = None
        if self.enabled and not self.quiet:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.total,
                initial=self.initial,
                desc=self.desc,
                unit="step",
                dynamic_ncols=True,
            )
        self._mark: tuple[float, int, int] | None = None  # (time, steps, images) at last read
        self._seen: dict[str, float] | None = None  # the metrics of the last read
        self._steps = 0
        self._images = 0

    def advance(self, steps: int, images: int) -> None:
        self.done += steps
        self._steps += steps
        self._images += images
        if self._bar is not None:
            self._bar.update(steps)

    def observe(self, latest: dict[str, float]) -> None:
        """After a host read of the metrics: update the pace and the bar's postfix.

        The pace is measured from read to read: dispatches return at once and the steps run
        behind them, so only a read (which waits for its step) marks real progress. The same
        read passed again is ignored."""
        if latest is self._seen:
            return
        self._seen = latest
        now = self.clock()
        postfix: dict[str, str] = {}
        if "loss" in latest:
            postfix["loss"] = f"{latest['loss']:.3f}"
        if "lr" in latest:
            postfix["lr"] = f"{latest['lr']:.4g}"
        if self._mark is not None:  # the first read includes compilation: not a pace
            then, steps, images = self._mark
            elapsed, ran = now - then, self._steps - steps
            if ran > 0 and elapsed > 0:
                pace = elapsed / ran
                old = self.seconds_per_step
                self.seconds_per_step = pace if old is None else old + SMOOTHING * (pace - old)
                self.images_per_sec = (self._images - images) / elapsed
                postfix["img/s"] = f"{self.images_per_sec:,.0f}"
        if self.seconds_per_step is not None:
            postfix["all"] = format_duration(self.remaining_seconds())
        self._mark = (now, self._steps, self._images)
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)

    def remaining_seconds(self) -> float:
        """This stage's and every later stage's steps at the measured time per step."""
        left = max(0, self.total - self.done) + self.later_steps
        return left * (self.seconds_per_step or 0.0)

    def note(self, line: str) -> None:
        """One line above the bar (or on stdout without one)."""
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

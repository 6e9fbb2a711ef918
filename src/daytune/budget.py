"""The wall-clock budget: a deadline the run always finishes inside, with time kept back for the final save.

`Budget.should_stop()` is asked before every optimizer step: it stops when the next step (measured, not guessed)
plus the save reserve would cross the deadline. The reserve starts from a measured save and grows if a real save
takes longer. Every duration the loop measures for these decisions is read from `Budget.clock`, so a test can
drive the budget logic with a fake clock instead of the machine's speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Budget:
    """Deadline bookkeeping. `seconds=None` means no limit (the run ends on steps/epochs alone)."""

    seconds: float | None
    start: float | None = None  # the clock's reading when the budget began (default: now)
    spent_before: float = 0.0  # time used by earlier attempts of a resumed run
    save_reserve: float = 1.0  # seconds kept back for the final save, updated from measured saves
    safety: float = 1.5  # the next step may take this much longer than the slowest recent step
    # before any step was measured: the time of one micro-batch (the first step is guarded per micro-batch)
    prior_step: float = 0.0
    clock: Callable[[], float] = time.monotonic  # seconds; tests pass a fake one
    _step_times: list[float] = field(default_factory=list)

    def __post_init__(self):
        if self.start is None:
            self.start = self.clock()

    def elapsed(self) -> float:
        return self.spent_before + (self.clock() - self.start)

    def remaining(self) -> float | None:
        return None if self.seconds is None else self.seconds - self.elapsed()

    def record_step(self, seconds: float) -> None:
        self._step_times.append(seconds)
        del self._step_times[:-20]

    def record_save(self, seconds: float) -> None:
        """Keep room for twice the slowest save seen so far."""
        self.save_reserve = max(self.save_reserve, 2.0 * seconds)

    def mean_step(self) -> float:
        return sum(self._step_times) / len(self._step_times) if self._step_times else 0.0

    def steps_left(self, extra_seconds: float = 0.0) -> int | None:
        """Asked once a step's work is done: that step plus the steps the stop rule will still let start (each
        taking the typical step time), None without a budget."""
        remaining = self.remaining()
        if remaining is None or not self._step_times:
            return None
        fit = remaining - self.save_reserve - extra_seconds - self.next_step_estimate()
        starts = int(fit / max(1e-9, self.mean_step())) + 1 if fit >= 0 else 0  # the next one starts at `fit`
        return 1 + starts

    def next_step_estimate(self) -> float:
        return (max(self._step_times) if self._step_times else self.prior_step) * self.safety

    def should_stop(self) -> bool:
        remaining = self.remaining()
        if remaining is None:
            return False
        return remaining < self.next_step_estimate() + self.save_reserve

    def can_afford(self, seconds: float) -> bool:
        """Is there time for `seconds` of extra work (an evaluation) and still a step and the final save?"""
        remaining = self.remaining()
        return remaining is None or remaining > seconds + self.next_step_estimate() + self.save_reserve

    def fraction_used(self) -> float:
        return 0.0 if self.seconds is None else min(1.0, self.elapsed() / self.seconds)

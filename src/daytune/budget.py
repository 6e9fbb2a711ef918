"""The wall-clock budget: a deadline the run always finishes inside, with time kept back for the final save.

`Budget.should_stop()` is asked before every optimizer step: it stops when the next step (measured, not guessed)
plus the save reserve would cross the deadline. The reserve starts from a measured save and grows if a real save
takes longer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Budget:
    """Deadline bookkeeping. `seconds=None` means no limit (the run ends on steps/epochs alone)."""

    seconds: float | None
    start: float = field(default_factory=time.monotonic)
    spent_before: float = 0.0  # time used by earlier attempts of a resumed run
    save_reserve: float = 1.0  # seconds kept back for the final save, updated from measured saves
    safety: float = 1.5  # the next step may take this much longer than the slowest recent step
    # before any step was measured: the time of one micro-batch (the first step is guarded per micro-batch)
    prior_step: float = 0.0
    _step_times: list[float] = field(default_factory=list)

    def elapsed(self) -> float:
        return self.spent_before + (time.monotonic() - self.start)

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
        """Steps that still fit before the stop rule fires (typical step time), None without a budget."""
        remaining = self.remaining()
        if remaining is None or not self._step_times:
            return None
        fit = remaining - self.save_reserve - extra_seconds - self.next_step_estimate()
        return max(0, int(fit / max(1e-9, self.mean_step()))) + 1

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

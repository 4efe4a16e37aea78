"""The watchdog's rule: when has an attempt made no progress for too long."""
from __future__ import annotations

import statistics


class StallClock:
    """Decides when an attempt has made no progress for too long (the watchdog's rule)."""

    def __init__(self, factor: float, floor_s: float, startup_s: float, now: float):
        self.factor, self.floor_s, self.startup_s = factor, floor_s, startup_s
        self.started = now
        self.last = None
        self.intervals: list[float] = []

    def progressed(self, now: float) -> None:
        if self.last is not None:
            self.intervals.append(now - self.last)
        self.last = now

    def limit_s(self) -> float:
        if self.last is None:
            return self.startup_s
        median = statistics.median(self.intervals) if self.intervals else 0.0
        return max(self.factor * median, self.floor_s)

    def stalled(self, now: float) -> bool:
        since = now - (self.last if self.last is not None else self.started)
        return since > self.limit_s()

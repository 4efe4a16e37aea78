"""The watchdog's rules: when has an attempt been stuck too long, judged by what the worker is doing.

Rank 0 beats every few seconds into ``heartbeat.json`` with its phase (set-up, loading,
training, saving, evaluating); the beat is liveness, not progress. The limit depends on
the phase:

* set-up and loading (before the first step): ``startup_timeout_s`` from the attempt's start;
* training: no progress record for max(``stall_factor`` x the median step interval,
  ``stall_floor_s``), so a rank stuck in a collective is caught within the step limit even
  though rank 0's beat goes on;
* saving / evaluating: max(``phase_factor`` x the longest earlier save/evaluation,
  ``save_floor_s``/``eval_floor_s``) from the phase's start, so a long FULL state-dict save
  or a long evaluation is never ended as a hang, while the training clock pauses;
* any phase: no beat at all for ``heartbeat_timeout_s`` (the worker is frozen).

Times are the supervisor's own (an injected monotonic clock); the worker's timestamps only
tell a new beat from an old one.
"""
from __future__ import annotations

import statistics

from ..config.launch import WatchdogPolicy

SLOW_PHASES = ("saving", "evaluating")


class StallClock:
    """No progress for too long (the training rule)."""

    def __init__(self, factor: float, floor_s: float, startup_s: float, now: float):
        self.factor, self.floor_s, self.startup_s = factor, floor_s, startup_s
        self.started = now
        self.last = None
        self.intervals: list[float] = []

    def progressed(self, now: float) -> None:
        if self.last is not None:
            self.intervals.append(now - self.last)
        self.last = now

    def pause_ended(self, now: float) -> None:
        """A save or an evaluation just ended: its time is not time without progress."""
        if self.last is None:
            self.started = now
        else:
            self.last = now

    def limit_s(self) -> float:
        if self.last is None:
            return self.startup_s
        median = statistics.median(self.intervals) if self.intervals else 0.0
        return max(self.factor * median, self.floor_s)

    def stalled(self, now: float) -> bool:
        since = now - (self.last if self.last is not None else self.started)
        return since > self.limit_s()


class Watchdog:
    """Decides, at each poll, whether an attempt must be ended as STALLED (see the module doc)."""

    def __init__(self, policy: WatchdogPolicy, now: float, earlier: dict[str, list[float]] | None = None):
        self.policy = policy
        self.steps = StallClock(policy.stall_factor, policy.stall_floor_s, policy.startup_timeout_s, now)
        self.durations: dict[str, list[float]] = {p: list((earlier or {}).get(p, [])) for p in SLOW_PHASES}
        self.phase: str | None = None
        self.phase_since = now
        self.last_beat: float | None = None      # our clock at the newest beat
        self._beat_stamp = None                  # the worker's time of the newest beat

    def progressed(self, now: float) -> None:
        self.steps.progressed(now)

    def queued(self, now: float) -> None:
        """Still waiting in a scheduler's queue: start-up has not begun."""
        if self.steps.last is None:
            self.steps.started = now

    def beat(self, record: dict | None, now: float) -> None:
        """Feed the latest ``heartbeat.json`` (the same record again is not a new beat)."""
        if not record or record.get("time") == self._beat_stamp:
            return
        self._beat_stamp, self.last_beat = record.get("time"), now
        phase = record.get("phase")
        if phase == self.phase:
            return
        if self.phase in SLOW_PHASES:
            self.durations[self.phase].append(now - self.phase_since)
            self.steps.pause_ended(now)
        self.phase, self.phase_since = phase, now

    def phase_limit_s(self) -> float:
        floor = self.policy.save_floor_s if self.phase == "saving" else self.policy.eval_floor_s
        longest = max(self.durations.get(self.phase) or [0.0])
        return max(floor, self.policy.phase_factor * longest)

    def stalled(self, now: float) -> str | None:
        """Why the attempt is stuck, or ``None``."""
        hb = self.policy.heartbeat_timeout_s
        if self.last_beat is not None and now - self.last_beat > hb:
            return f"no heartbeat from rank 0 for {now - self.last_beat:.0f} s (limit {hb:.0f} s): the worker is frozen"
        if self.phase in SLOW_PHASES:
            limit = self.phase_limit_s()
            if now - self.phase_since > limit:
                what = "a checkpoint save" if self.phase == "saving" else "an evaluation"
                return f"{what} has run for {now - self.phase_since:.0f} s (limit {limit:.0f} s)"
            return None
        if self.steps.stalled(now):
            return f"no progress for {self.steps.limit_s():.0f} s"
        return None

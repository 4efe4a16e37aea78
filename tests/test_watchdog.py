"""The phase-aware watchdog (orchestrator/supervise/watchdog.py), in simulated time."""
from __future__ import annotations

from orchestrator.config.launch import WatchdogPolicy
from orchestrator.supervise.watchdog import Watchdog

POLICY = WatchdogPolicy(stall_factor=5, stall_floor_s=30, startup_timeout_s=100, save_floor_s=60, eval_floor_s=50,
                        phase_factor=3, heartbeat_timeout_s=20)


class Run:
    """Drive a watchdog: beats every 2 s in a phase, steps every ``step_s`` while training."""

    def __init__(self, earlier=None):
        self.now = 0.0
        self.wd = Watchdog(POLICY, self.now, earlier)
        self.phase = "setup"

    def go(self, seconds: float, phase: str | None = None, step_s: float | None = None, beats: bool = True):
        self.phase = phase or self.phase
        next_step = self.now + step_s if step_s else None
        end = self.now + seconds
        while self.now < end:
            self.now += 1.0
            if beats and int(self.now) % 2 == 0:
                self.wd.beat({"phase": self.phase, "time": self.now + 0.123}, self.now)
            if next_step is not None and self.now >= next_step:
                self.wd.progressed(self.now)
                next_step += step_s
            why = self.wd.stalled(self.now)
            if why:
                return why
        return None


def test_training_steps_keep_it_alive_and_a_stuck_collective_is_caught_at_the_step_limit():
    r = Run()
    assert r.go(20, "loading") is None
    assert r.go(60, "training", step_s=2) is None
    why = r.go(100, "training")          # beats go on (a thread), steps stop (a rank is stuck in a collective)
    assert why.startswith("no progress for 30 s") and r.now <= 80 + 32


def test_a_long_save_is_not_a_hang_but_a_save_far_longer_than_ever_is():
    r = Run()
    r.go(10, "training", step_s=2)
    assert r.go(55, "saving") is None                        # under the 60 s floor
    assert r.go(40, "training", step_s=2) is None            # the save's time did not count as no-progress
    assert r.wd.durations["saving"] == [54.0]                # as seen between beats (every 2 s)
    assert r.go(150, "saving") is None                       # 3 x the longest earlier save (162 s) allows this
    why = r.go(100, "saving")
    assert why.startswith("a checkpoint save has run for 163 s (limit 162 s)")


def test_earlier_attempts_saves_set_the_limit_from_the_start():
    r = Run(earlier={"saving": [100.0]})
    r.go(10, "training", step_s=2)
    assert r.go(299, "saving") is None
    assert "limit 300 s" in r.go(5, "saving")


def test_an_evaluation_has_its_own_floor():
    r = Run()
    r.go(10, "training", step_s=2)
    assert r.go(48, "evaluating") is None
    assert "an evaluation has run for 51 s (limit 50 s)" == r.go(10, "evaluating")


def test_a_frozen_worker_is_caught_by_its_missing_heartbeat_in_any_phase():
    r = Run()
    r.go(10, "training", step_s=2)
    r.go(4, "saving")
    why = r.go(60, "saving", beats=False)
    assert why.startswith("no heartbeat from rank 0 for 21 s")


def test_before_any_beat_or_step_the_startup_timeout_applies():
    r = Run()
    assert r.go(99, beats=False) is None
    assert r.go(5, beats=False).startswith("no progress for 100 s")

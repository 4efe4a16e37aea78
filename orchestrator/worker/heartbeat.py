"""Rank 0's liveness beat and phase, written to ``heartbeat.json`` in the attempt directory.

A thread of its own writes the beat every ``channel.HEARTBEAT_S`` seconds (so a long save,
evaluation or data load still beats), and every phase change is written at once. The
supervisor's watchdog reads it (:mod:`orchestrator.supervise.watchdog`): the phase decides
which time limit applies; a missing beat means a frozen process. It is liveness, not
progress: a rank stuck in a collective keeps beating and is caught by the step limit.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

from . import channel


class Heartbeat:
    """The beat of one process; only rank 0's writes anything (``enabled``)."""

    def __init__(self, attempt_dir: str | Path, enabled: bool, interval_s: float = channel.HEARTBEAT_S):
        self.path = Path(attempt_dir) / channel.HEARTBEAT_FILE
        self.enabled, self.interval_s = enabled, interval_s
        self.phase_name, self.since, self.step = "setup", time.time(), 0
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> "Heartbeat":
        """Write the first beat and keep beating from a daemon thread."""
        if self.enabled:
            self._write()
            threading.Thread(target=self._loop, name="orchestrate-heartbeat", daemon=True).start()
        return self

    def phase(self, name: str, step: int | None = None) -> None:
        """Enter phase ``name`` (one of ``channel.PHASES``) and say so at once."""
        with self._lock:
            if step is not None:
                self.step = int(step)
            if name != self.phase_name:
                self.phase_name, self.since = name, time.time()
        if self.enabled:
            self._write()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write()

    def _write(self) -> None:
        with self._lock:
            record = {"phase": self.phase_name, "since": round(self.since, 3), "time": round(time.time(), 3),
                      "step": self.step}
        try:
            channel.write_json_atomic(self.path, record)
        except OSError:
            pass  # a full or flaky disk: the watchdog then sees no beat, which is what it is

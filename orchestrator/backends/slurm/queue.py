"""What SLURM says about jobs: one batched ``squeue`` call per refresh (``sacct`` for jobs squeue has
forgotten), with backoff while nothing changes; parsed from SLURM's structured output only."""
from __future__ import annotations

import time
from typing import Callable

from .states import JobInfo, parse_sacct, parse_squeue, sacct_argv, squeue_argv
from .submit import Runner, run_command


class SlurmQueue:
    """State of every job this backend follows: one batched squeue call (sacct for what squeue
    forgot) per refresh; the interval grows from ``min_s`` to ``max_s`` while nothing changes."""

    FORCE_MIN_S = 0.5

    def __init__(self, runner: Runner = run_command, clock: Callable[[], float] = time.monotonic,
                 min_s: float = 1.0, max_s: float = 5.0):
        self.runner, self.clock, self.min_s, self.max_s = runner, clock, min_s, max_s
        self.interval = min_s
        self._next = self._last = float("-inf")
        self._watched: set[str] = set()
        self.known: dict[str, JobInfo] = {}
        self.first_seen: dict[str, float] = {}
        self.reachable = True          # did squeue answer at the last refresh

    def watch(self, job_id: str) -> None:
        """Follow ``job_id`` from now on (until SLURM reports it ended)."""
        ended = job_id in self.known and not self.known[job_id].active
        if job_id not in self._watched and not ended:
            self._watched.add(job_id)
            self.first_seen.setdefault(job_id, self.clock())
            self._next = float("-inf")

    def info(self, job_id: str, force: bool = False) -> JobInfo | None:
        """The latest known state of ``job_id`` (``None``: SLURM does not know it).

        ``force`` asks SLURM now (at most every ``FORCE_MIN_S``), e.g. once the nodes reported the end.
        """
        self.watch(job_id)
        now = self.clock()
        if now >= self._next or (force and now - self._last >= self.FORCE_MIN_S):
            self.refresh()
        return self.known.get(job_id)

    def refresh(self) -> None:
        """Ask SLURM about every followed job: one squeue call, one sacct call for what squeue forgot."""
        ids = sorted(self._watched)
        rc, out, err = self.runner(squeue_argv(ids))
        found = parse_squeue(out) if rc == 0 else {}
        # "Invalid job id" (all of them purged) is an answer; anything else means the controller did not answer.
        self.reachable = rc == 0 or "invalid job id" in err.lower()
        missing = [i for i in ids if i not in found]
        if missing:
            rc, out, _ = self.runner(sacct_argv(missing))
            found.update(parse_sacct(out) if rc == 0 else {})
        changed = any(self.known.get(i) is None or self.known[i].state != found[i].state for i in found)
        self.known.update(found)
        for i in ids:  # stop asking about jobs that ended
            if i in self.known and not self.known[i].active:
                self._watched.discard(i)
        self.interval = self.min_s if changed else min(self.interval * 1.5, self.max_s)
        self._last = self.clock()
        self._next = self._last + self.interval

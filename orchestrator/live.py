"""Reading snapshots from disk and showing them: once, or live while a job runs."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from rich.console import Console

from .follow import ProgressFollower
from .ledger import Job, Ledger
from .paths import RunPaths
from .render import Snapshot, job_detail, jobs_table

REFRESH_S = 0.5


def snapshot(job: Job, follower: ProgressFollower | None = None) -> Snapshot:
    """Ledger row + progress file of one job (the follower keeps its offset between calls)."""
    follower = follower or ProgressFollower(RunPaths(Path(job.run_dir)).progress)
    follower.poll()
    return Snapshot(job=job, progress=follower.state, now=time.time())


def _console() -> Console:
    # Escape codes only on a terminal; pipes get plain text.
    return Console(highlight=False, soft_wrap=False) if sys.stdout.isatty() else \
        Console(highlight=False, no_color=True, force_terminal=False, width=200)


def print_table(jobs: list[Job]) -> None:
    _console().print(jobs_table([snapshot(j) for j in jobs]))


def print_detail(job: Job) -> None:
    _console().print(job_detail(snapshot(job)))


class LiveView:
    """Shows one job while the supervisor runs it in this process.

    A daemon thread re-renders at a bounded rate from the ledger and the progress
    file; supervisor events are printed through the live console so they never
    tear the display. Without a terminal it prints events only.
    """

    def __init__(self, ledger: Ledger, job_id: str):
        self.ledger, self.job_id = ledger, job_id
        self.console = Console(stderr=False) if sys.stdout.isatty() else None
        self._stop = threading.Event()
        self._follower: ProgressFollower | None = None
        self._live = None
        self._thread: threading.Thread | None = None

    def _render(self):
        job = self.ledger.get(self.job_id)
        if self._follower is None:
            self._follower = ProgressFollower(RunPaths(Path(job.run_dir)).progress)
        return job_detail(snapshot(job, self._follower))

    def __enter__(self) -> "LiveView":
        if self.console is not None:
            from rich.live import Live

            self._live = Live(self._render(), console=self.console, auto_refresh=False, transient=False)
            self._live.__enter__()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                self._live.update(self._render(), refresh=True)
            except Exception:  # a transient read error must not kill the view
                continue

    def event(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        if self._live is not None:
            self._live.console.print(f"[dim]{stamp}[/dim] {message}", highlight=False)
        else:
            print(f"{stamp} {message}", flush=True)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
            self._live.__exit__(*exc)
        elif not any(exc):
            job = self.ledger.get(self.job_id)
            print(f"{job.id}: {job.state.value} at step {job.step}/{job.max_steps or '?'}", flush=True)

"""Showing snapshots: once (``--once``, pipes), live (``status``), or beside a supervisor (``submit``).

Snapshots come from :class:`~orchestrator.snapshots.SnapshotSource`, called at a bounded
rate (``REFRESH_S``) and handed to the pure renderers of ``render.py``: nothing in a render
does I/O or calls a scheduler, and nothing prints around a live display (supervisor events
go through the live console; rich redirects stray stdout/stderr the same way).
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

from ..store.ledger import Job, Ledger
from ..store.paths import RunPaths
from ..store.progress import ProgressFollower
from .goodput_view import summary_line
from .render import Snapshot, detail_frame, list_table, status_frame
from .snapshots import SnapshotSource

__all__ = ["SnapshotSource", "snapshot", "make_console", "print_table", "print_list", "print_detail", "watch",
           "LiveView"]

REFRESH_S = 1.0
STATUS_HINT = "Ctrl-C leaves this view; the jobs keep running.   orchestrate status JOB: one job in detail"
JOB_HINT = "Ctrl-C leaves this view; the job keeps running."
SUBMIT_HINT = ("Ctrl-C CANCELS this job (every process of it).   "
               "To keep it running without this terminal: orchestrate submit --detach")


def snapshot(job: Job, follower: ProgressFollower | None = None) -> Snapshot:
    """Ledger row + progress file of one job (the follower keeps its offset between calls)."""
    follower = follower or ProgressFollower(RunPaths(Path(job.run_dir)).progress)
    follower.poll()
    return Snapshot(job=job, progress=follower.state, now=time.time())


def make_console(file=None) -> Console:
    """Escape codes only on a terminal; pipes and files get plain text, never cut."""
    file = file or sys.stdout
    if file.isatty():
        return Console(file=file, highlight=False)
    return Console(file=file, highlight=False, no_color=True, force_terminal=False, width=1000,
                   emoji=False, soft_wrap=False)


def print_table(jobs: list[Job], ledger: Ledger | None = None) -> None:
    """All ``jobs`` as the status table (one frame)."""
    source = SnapshotSource(ledger)
    snaps = [source.snapshot(j) for j in jobs]
    make_console().print(status_frame(snaps, time.time()))


def print_list(jobs: list[Job]) -> None:
    """``orchestrate list``: ledger columns only."""
    make_console().print(list_table(jobs, time.time()))


def print_detail(job: Job, ledger: Ledger | None = None) -> None:
    """One job in detail (one frame)."""
    source = SnapshotSource(ledger)
    make_console().print(detail_frame(source.snapshot(job, detail=True)))


def watch(ledger: Ledger, job_id: str | None = None, interval: float = REFRESH_S,
          console: Console | None = None, stop: threading.Event | None = None) -> int:
    """``orchestrate status`` on a terminal: redraw every ``interval`` seconds until Ctrl-C.

    With ``job_id`` the view ends by itself once the job has ended (after its last frame).
    """
    from rich.live import Live

    console = console or make_console()
    source = SnapshotSource.for_ledger(ledger)
    stop = stop or threading.Event()

    def frame():
        if job_id is not None:
            snap = source.one(job_id)
            return detail_frame(snap, JOB_HINT, *console.size), snap.job.state.is_terminal
        rows = max(1, console.size.height - 4)
        return status_frame(source.all(incremental=True), time.time(), max_rows=rows, hint=STATUS_HINT), False

    try:
        renderable, done = frame()
        with Live(renderable, console=console, auto_refresh=False, transient=False,
                  vertical_overflow="crop") as live:
            while not done and not stop.wait(interval):
                renderable, done = frame()
                live.update(renderable, refresh=True)
    except KeyboardInterrupt:
        pass
    return 0


class LiveView:
    """Shows one job while the supervisor runs it in this process (``submit``, ``resume``).

    A daemon thread re-renders at a bounded rate from the ledger and the progress file;
    supervisor events are printed through the live console so they never tear the
    display. The top line says that Ctrl-C cancels the job. Without a terminal it
    prints events only.
    """

    def __init__(self, ledger: Ledger, job_id: str, interval: float = REFRESH_S, console: Console | None = None):
        self.ledger, self.job_id, self.interval = ledger, job_id, interval
        self.console = console or (Console(highlight=False) if sys.stdout.isatty() else None)
        self._source = SnapshotSource(ledger)
        self._stop = threading.Event()
        self._live = None
        self._thread: threading.Thread | None = None

    def _render(self):
        return detail_frame(self._source.one(self.job_id), SUBMIT_HINT, *self.console.size)

    def __enter__(self) -> "LiveView":
        if self.console is not None:
            from rich.live import Live

            self._live = Live(self._render(), console=self.console, auto_refresh=False, transient=False,
                              vertical_overflow="crop")
            self._live.__enter__()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._live.update(self._render(), refresh=True)
            except Exception:  # a transient read error must not kill the view
                continue

    def hang_up(self) -> None:
        """The terminal is gone (SIGHUP): stop drawing; later events become plain lines (in the job's log)."""
        self._stop.set()
        self._live = None
        self.console = None
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__   # undo the live display's redirection

    def event(self, message: str) -> None:
        """A supervisor event: above the live display, or a plain line without a terminal."""
        stamp = time.strftime("%H:%M:%S")
        if self._live is not None:
            self._live.console.print(Text.assemble((stamp, "dim"), " ", message), highlight=False)
        else:
            print(f"{stamp} {message}", flush=True)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._live is not None:
            try:
                self._live.update(detail_frame(self._source.one(self.job_id), None, *self.console.size), refresh=True)
            finally:
                self._live.__exit__(*exc)
        if not any(exc):
            print(final_summary(self._source.one(self.job_id)), flush=True)


def final_summary(snap) -> str:
    """What a user wants when a job ends: where it got, its loss, its model, and what to run next."""
    job, p = snap.job, snap.progress
    ended = job.state.is_terminal
    lines = [f"{job.id}: {job.state.value} at step {job.step}/{job.max_steps or '?'}"
             + (f", {'final ' if ended else ''}loss {p.loss:.4f}" if isinstance(p.loss, (int, float)) else "")]
    if not ended:   # issue 19: handed to a background supervisor (the terminal closed): it goes on
        lines.append(f"  still running, supervised in the background: orchestrate status {job.id}   |   "
                     f"orchestrate logs {job.id} -f")
        return "\n".join(lines)
    if job.final_model:
        lines.append(f"  model:       {job.final_model}  (AutoModelForCausalLM.from_pretrained loads it)")
    if summary_line(snap.goodput):
        lines.append(summary_line(snap.goodput))
    if job.state.value == "COMPLETED":
        lines.append(f"  next:        orchestrate status {job.id}   |   orchestrate report {job.id}   |   "
                     f"orchestrate export {job.id} --out DIR")
    else:
        lines.append(f"  next:        orchestrate status {job.id}   |   orchestrate logs {job.id} --errors   |   "
                     f"orchestrate resume {job.id}")
    return "\n".join(lines)

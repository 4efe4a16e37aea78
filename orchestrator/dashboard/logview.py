"""``orchestrate logs``: print or follow (``-f``) a job's rank logs with a ``[rank R]`` prefix.

Following polls the files and the ledger at a bounded rate and stops when the attempt
(``--attempt N``) or the job ends; without ``--attempt`` it moves on to each new attempt.
A failed attempt ends with a pointer to its first error and where its traceback is;
``--errors`` prints just that. Import-light (no torch, no rich).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from ..store.ledger import Job, Ledger
from ..store.logs import FirstError, LogFollower, RankLog, first_error, locate_traceback, rank_logs, tail_lines
from ..store.paths import RunPaths
from ..worker import channel

FOLLOW_DEFAULT_LINES = 10
POLL_S = 0.5
LEDGER_EVERY_S = 1.0


def nproc_of(job: Job) -> int | None:
    """``nproc_per_node`` from the job's frozen plan (``None`` if unreadable)."""
    plan = channel.read_json(RunPaths(Path(job.run_dir)).plan) or {}
    n = plan.get("nproc_per_node")
    return n if isinstance(n, int) and n > 0 else None


class LogPrinter:
    """Prints log lines and headers to ``out``; one instance per ``logs`` command."""

    def __init__(self, job: Job, rank: int | None, out: TextIO):
        self.job, self.rank, self.out = job, rank, out
        self.paths = RunPaths(Path(job.run_dir))
        self.nproc = nproc_of(job)

    def logs(self, attempt: int) -> list[RankLog]:
        """The attempt's rank logs, filtered by ``--rank``."""
        found = rank_logs(self.paths.attempt_dir(attempt), self.nproc)
        return [r for r in found if self.rank is None or r.rank == self.rank]

    def header(self, text: str) -> None:
        """A ``==> text <==`` line, as ``tail`` marks files."""
        self.out.write(f"==> {text} <==\n")

    def lines(self, items) -> None:
        """Print ``(RankLog, line)`` pairs with their rank prefix."""
        for log, line in items:
            self.out.write(f"{log.prefix} {line}\n")
        self.out.flush()

    def dump(self, attempt: int, n: int | None, follower: LogFollower | None = None) -> None:
        """Each file of the attempt (its last ``n`` lines, or all); ``follower`` continues after them."""
        for log in self.logs(attempt):
            if n is None:   # all of it, streamed: a log can be bigger than memory
                reader = LogFollower([log])
                while batch := reader.poll():
                    self.lines(batch)
                offset = reader.offsets[log.path]
            else:
                last, offset = tail_lines(log.path, n)
                self.lines((log, line) for line in last)
            if follower is not None:
                follower.add(log, offset)
            else:   # a finished log: its last line may lack the newline (a progress bar)
                self.lines((log, line) for line in _unterminated(log.path, offset))

    def error_pointer(self, attempt: int) -> None:
        """After a failed attempt: its first error and where the traceback is."""
        err = first_error(self.paths.attempt_dir(attempt))
        if err is None:
            return
        self.header(f"attempt {attempt}: first error on {err.line()}")
        found = locate_traceback(rank_logs(self.paths.attempt_dir(attempt), self.nproc), err.rank)
        where = f"{found[0].path}:{found[1]}" if found else (err.source or "")
        self.out.write(f"    traceback: orchestrate logs {self.job.id} --attempt {attempt} --errors   ({where})\n")
        self.out.flush()

    def errors(self, attempt: int) -> bool:
        """Print the first error of ``attempt`` with its traceback; ``False`` if it has none."""
        adir = self.paths.attempt_dir(attempt)
        err: FirstError | None = first_error(adir)
        found = locate_traceback(rank_logs(adir, self.nproc), err.rank if err else None)
        if err is None and found is None:
            return False
        if err is not None:
            stamp = time.strftime(" at %H:%M:%S", time.localtime(err.time)) if err.time else ""
            self.header(f"attempt {attempt}: first error{stamp} on {err.line()}")
            if err.traceback:
                self.out.write(err.traceback.rstrip("\n") + "\n")
            if err.source:
                self.out.write(f"    (record: {err.source})\n")
        if found is not None and (err is None or not err.traceback):
            log, line_no, block = found
            self.header(f"first traceback in the logs: {log.path}:{line_no}")
            self.lines((log, line) for line in block)
        elif found is not None:
            self.out.write(f"    (printed by rank {found[0].rank} at {found[0].path}:{found[1]})\n")
        self.out.flush()
        return True


def _unterminated(path: Path, offset: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            rest = f.read(1 << 20).decode(errors="replace")
    except OSError:
        return []
    return [rest.rsplit("\r", 1)[-1]] if rest.strip() else []


def _pick_attempt(job: Job, attempt: int | None, failed_first: bool) -> int | None:
    if attempt is not None:
        return attempt
    if failed_first:
        failed = [a.n for a in job.attempts if a.failure and a.failure not in ("COMPLETED", "CANCELLED")]
        if failed:
            return failed[-1]
    return job.attempts[-1].n if job.attempts else None


def show_logs(ledger: Ledger, job: Job, *, attempt: int | None = None, rank: int | None = None,
              follow: bool = False, errors: bool = False, lines: int | None = None,
              out: TextIO | None = None, sleep: Callable[[float], None] = time.sleep) -> int:
    """The ``logs`` verb; returns the exit status (2: no such attempt)."""
    out = out or sys.stdout
    printer = LogPrinter(job, rank, out)
    if attempt is not None and attempt not in [a.n for a in job.attempts]:
        print(f"error: {job.id} has no attempt {attempt} (it has {len(job.attempts)})", file=sys.stderr)
        return 2
    if errors:
        n = _pick_attempt(job, attempt, failed_first=True)
        if n is None or not printer.errors(n):
            print(f"{job.id}: no error recorded" + (f" for attempt {n}" if n else ""), file=sys.stderr)
        return 0
    if not follow:
        n = _pick_attempt(job, attempt, failed_first=False)
        if n is None:
            print(f"{job.id}: no attempt has started yet ({job.state.value})", file=sys.stderr)
            return 0
        printer.dump(n, lines)
        printer.error_pointer(n)
        return 0
    try:
        return _follow(ledger, job, printer, attempt, FOLLOW_DEFAULT_LINES if lines is None else lines, sleep)
    except KeyboardInterrupt:
        return 0


def _drain(printer: LogPrinter, follower: LogFollower) -> None:
    """Everything left in the files of an attempt that has ended, unterminated last lines too."""
    while batch := follower.poll():
        printer.lines(batch)
    for log in follower.logs:
        printer.lines((log, line) for line in _unterminated(log.path, follower.offsets[log.path]))


def _follow(ledger: Ledger, job: Job, printer: LogPrinter, only: int | None, n: int, sleep) -> int:
    current, follower = None, LogFollower()
    last_check = 0.0
    while True:
        now = time.monotonic()
        if now - last_check >= LEDGER_EVERY_S:
            last_check = now
            job = ledger.get(job.id) or job
            target = only if only is not None else (job.attempts[-1].n if job.attempts else None)
            if target is not None and target != current:
                if current is not None:   # the job moved on to its next attempt
                    _drain(printer, follower)
                    printer.error_pointer(current)
                printer.header(f"{job.id} attempt {target}: {printer.paths.rank_log_dir(target)}")
                current, follower = target, LogFollower()
                printer.dump(current, n, follower)
            elif current is not None:
                for log in printer.logs(current):   # ranks start after their attempt does
                    follower.add(log, 0)
            mine = next((a for a in job.attempts if a.n == current), None)
            if (only is not None and mine is not None and mine.ended is not None) or job.state.is_terminal:
                _drain(printer, follower)
                if current is not None:
                    printer.error_pointer(current)
                if only is not None and mine is not None and not job.state.is_terminal:
                    printer.header(f"{job.id} attempt {current} ended: {mine.failure}")
                else:
                    printer.header(f"{job.id}: {job.state.value}" + (f" ({job.message})" if job.message else ""))
                return 0
        printer.lines(follower.poll())
        sleep(POLL_S)

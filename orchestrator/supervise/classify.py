"""The one table from how an attempt ended (torchrun exit codes, the worker's status and
error records, a scheduler's verdict) to its :class:`~orchestrator.states.Failure` class,
and from that class to the job's next state. Nothing else interprets raw exit codes.
"""
from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from signal import SIGTERM

from ..states import Failure, JobState
from ..worker.channel import EXIT_STOPPED

# A worker that stopped gracefully on a signal exits EXIT_STOPPED (75, EX_TEMPFAIL);
# torchrun itself exits 1 then, so orchestrator.worker.agent passes the ranks' code through.

# Exception types that mean "the job itself is wrong", raised before training starts.
USER_ERROR_TYPES = frozenset(
    {
        "ValueError", "KeyError", "TypeError", "ImportError", "ModuleNotFoundError",
        "FileNotFoundError", "NotADirectoryError", "IsADirectoryError", "AttributeError",
        "NameError", "SyntaxError", "IndexError", "OSError", "DatasetGenerationError",
        "EnvironmentError", "PermissionError", "UnicodeDecodeError", "JSONDecodeError",
    }
)
_OOM_TYPES = frozenset({"OutOfMemoryError", "MemoryError"})
ENOSPC = errno.ENOSPC
# OS errors that say "the job is wrong" (a missing or forbidden file): never retried. Any other
# errno during set-up (EIO, ESTALE, ETIMEDOUT, ...) is a flaky filesystem or network: retried.
USER_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG,
                         errno.EROFS, errno.ELOOP})
_IO_TYPES = frozenset({"OSError", "IOError", "RuntimeError", "SafetensorError"})
_DISK_FULL_WORDS = ("no space left on device", "disk is full", "disk quota exceeded")
# "WandbCallback requires wandb to be installed", "... is not installed. Run `pip install ...`": a missing
# package, however the library words it; retrying cannot install it.
_MISSING_PACKAGE = re.compile(r"requires? [\w.\- ]+ to be installed|is not installed|pip install [\w.\-\[\]]+")


@dataclass(frozen=True)
class Outcome:
    """Everything structured known about how an attempt ended."""

    returncode: int | None                 # the agent's exit status (negative: killed by a signal)
    agent: dict | None = None              # agent.json: per-rank exit codes and signals
    worker_state: str | None = None        # status.json "state" written by rank 0
    error: dict | None = None              # the first error-rank<R>.json record
    stalled: bool = False                  # ended by the watchdog
    cancelled: bool = False                # ended on the user's request
    disk_low: bool = False                 # the output folder had less free space than a checkpoint takes


def classify(o: Outcome) -> Failure:
    """The one table from an attempt's outcome to its failure class (local torchrun)."""
    if o.cancelled:
        return Failure.CANCELLED
    if o.stalled:
        return Failure.STALLED
    if o.worker_state == "completed":
        # Training finished and the final status was written; an abort during
        # process-group teardown afterwards lost no work (see notes/cpu-training.md).
        return Failure.COMPLETED
    # A scheduler's verdict on what only it knows (cancelled from outside, node failure, time
    # limit, memory limit): the SLURM state table in backends/slurm/states.py, put into the merged
    # agent.json by backends/slurm/records.py (issue 4). None for a plain COMPLETED/FAILED job.
    if (o.agent or {}).get("scheduler_failure"):
        return Failure(o.agent["scheduler_failure"])
    if o.agent is None and o.returncode not in (0, None, EXIT_STOPPED):
        # The torchrun agent itself died without its record (kill -9): whatever the
        # orphaned ranks did afterwards (the supervisor stops them), the agent was lost.
        return Failure.WORKER_LOST
    rank_codes = [f.get("exitcode") for f in ((o.agent or {}).get("failures") or {}).values()]
    if o.worker_state == "stopped" or o.returncode == EXIT_STOPPED or EXIT_STOPPED in rank_codes:
        return Failure.PREEMPTED
    if any(isinstance(c, int) and c < 0 and c != -SIGTERM for c in rank_codes):
        # A rank died from a signal (kill -9, the OOM killer); errors on the other ranks
        # (connection reset in a collective) are echoes of that death, not the cause.
        # SIGTERM is not counted: torchrun sends it to the survivors once one rank failed,
        # and a worker given SIGTERM from outside stops gracefully (exit 75) instead.
        return Failure.KILLED
    if o.error:
        return _classify_error(o.error, o.disk_low)
    if o.disk_low and o.returncode not in (0, None):
        return Failure.DISK_FULL   # not even the error record could be written
    return Failure.WORKER_LOST


def _classify_error(error: dict, disk_low: bool) -> Failure:
    """A rank's error record (the earliest one: the root cause) -> its failure class."""
    etype, msg, code = error.get("type", ""), str(error.get("message", "")).lower(), error.get("errno")
    if etype in _OOM_TYPES or "out of memory" in msg:
        return Failure.OOM
    # torch's writers do not say why ("file write failed", "unexpected pos 336512 vs 336404"): an I/O-ish
    # error with the disk (nearly) full is that.
    io_error = etype in _IO_TYPES or "write" in msg
    if code == ENOSPC or any(w in msg for w in _DISK_FULL_WORDS) or (disk_low and io_error):
        return Failure.DISK_FULL
    if "timeout" in etype.lower() or "timed out" in msg:
        return Failure.COLLECTIVE_TIMEOUT
    if error.get("phase") == "setup":
        if isinstance(code, int) and code not in USER_ERRNOS:
            return Failure.CRASHED          # a transient filesystem error: retried
        if etype in USER_ERROR_TYPES or _MISSING_PACKAGE.search(msg):
            return Failure.USER_ERROR
    return Failure.CRASHED


def job_state_after(failure: Failure, will_retry: bool) -> JobState:
    """The job state once an attempt ended with ``failure``."""
    if failure is Failure.COMPLETED:
        return JobState.COMPLETED
    if failure is Failure.CANCELLED:
        return JobState.CANCELLED
    return JobState.RESUMING if will_retry else JobState.FAILED

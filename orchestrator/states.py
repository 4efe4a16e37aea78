"""One job-state enum, one failure-class enum, and the one table that maps the
outside world (torchrun exit codes, the worker's status record, SLURM states via
``slurm_states.SLURM_STATES``) into them. Nothing else in the package interprets raw exit codes.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from signal import SIGTERM

from .channel import EXIT_STOPPED


class JobState(str, enum.Enum):
    """Lifecycle of a job as the ledger records it."""

    PENDING = "PENDING"      # submitted, no attempt started yet
    RUNNING = "RUNNING"      # an attempt is running
    RESUMING = "RESUMING"    # an attempt ended; the supervisor is about to start the next
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


class Failure(str, enum.Enum):
    """Why an attempt ended. ``COMPLETED`` is the one that is not a failure."""

    COMPLETED = "COMPLETED"
    PREEMPTED = "PREEMPTED"        # graceful stop on a signal: checkpoint saved, resumable
    OOM = "OOM"
    COLLECTIVE_TIMEOUT = "COLLECTIVE_TIMEOUT"  # NCCL/gloo watchdog or collective timeout
    KILLED = "KILLED"              # a process died from a signal (kill -9, OOM killer, ...)
    WORKER_LOST = "WORKER_LOST"    # a rank or the torchrun agent vanished / failed unclassified
    STALLED = "STALLED"            # no progress for too long: ended by the watchdog
    USER_ERROR = "USER_ERROR"      # config, data, model or code error before the first step
    CRASHED = "CRASHED"            # a rank raised during training (not OOM, not a timeout)
    CANCELLED = "CANCELLED"        # the user asked for it

    @property
    def transient(self) -> bool:
        """Failures that a plain retry from the last checkpoint can fix."""
        return self in _TRANSIENT


_TRANSIENT = frozenset(
    {Failure.PREEMPTED, Failure.COLLECTIVE_TIMEOUT, Failure.KILLED, Failure.WORKER_LOST, Failure.STALLED,
     Failure.CRASHED}
)

# A worker that stopped gracefully on a signal exits EXIT_STOPPED (75, EX_TEMPFAIL);
# torchrun itself exits 1 then, so orchestrator.agent passes the ranks' code through.

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


@dataclass(frozen=True)
class Outcome:
    """Everything structured known about how an attempt ended."""

    returncode: int | None                 # the agent's exit status (negative: killed by a signal)
    agent: dict | None = None              # agent.json: per-rank exit codes and signals
    worker_state: str | None = None        # status.json "state" written by rank 0
    error: dict | None = None              # the first error-rank<R>.json record
    stalled: bool = False                  # ended by the watchdog
    cancelled: bool = False                # ended on the user's request


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
    # limit, memory limit): the SLURM state table in slurm_states.py, put into the merged
    # agent.json by backends/slurm.py (issue 4). None for a plain COMPLETED/FAILED job.
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
        etype, msg = o.error.get("type", ""), str(o.error.get("message", "")).lower()
        if etype in _OOM_TYPES or "out of memory" in msg:
            return Failure.OOM
        if "timeout" in etype.lower() or "timed out" in msg:
            return Failure.COLLECTIVE_TIMEOUT
        if o.error.get("phase") == "setup" and etype in USER_ERROR_TYPES:
            return Failure.USER_ERROR
        return Failure.CRASHED
    return Failure.WORKER_LOST


def job_state_after(failure: Failure, will_retry: bool) -> JobState:
    """The job state once an attempt ended with ``failure``."""
    if failure is Failure.COMPLETED:
        return JobState.COMPLETED
    if failure is Failure.CANCELLED:
        return JobState.CANCELLED
    return JobState.RESUMING if will_retry else JobState.FAILED

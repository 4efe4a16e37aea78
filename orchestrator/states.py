"""The project's vocabulary: one job-state enum and one failure-class enum.

Every layer speaks these two. What maps the outside world into them lives at the
boundaries: :mod:`orchestrator.supervise.classify` (torchrun exit codes and the worker's
records) and :mod:`orchestrator.backends.slurm.states` (SLURM's job states).
"""
from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    """Lifecycle of a job as the ledger records it."""

    QUEUED = "QUEUED"        # a job of a sweep waiting on this machine for a free slot (GPUs/CPU ranks)
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
    DISK_FULL = "DISK_FULL"        # no space left where the job writes (checkpoints, logs, the ledger)
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

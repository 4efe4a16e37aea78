"""The interface every backend implements (local torchrun now, SLURM next)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class AttemptHandle:
    """Enough to find a running attempt again, also from another process (``resume``)."""

    job_id: str
    attempt: int
    pid: int            # local: the torchrun agent; SLURM: the job id lives in ``external_id``
    attempt_dir: str
    external_id: str | None = None
    pid_start: float | None = None   # the agent's start time: with pid and host, its identity
    host: str | None = None


class Backend(Protocol):
    name: str

    def start(self, plan, attempt: int, resume_from: str | None) -> AttemptHandle:
        """Start the attempt and return at once."""

    def poll(self, handle: AttemptHandle) -> int | None:
        """``None`` while it runs, else its exit status (negative: killed by that signal)."""

    def signal(self, handle: AttemptHandle, signame: str) -> None:
        """Deliver a graceful-stop signal to every rank."""

    def kill(self, handle: AttemptHandle, grace_s: float = 10.0) -> list[int]:
        """End the attempt's whole process tree; return PIDs still alive afterwards (none, normally)."""

    def reattach(self, handle: AttemptHandle) -> bool:
        """True if the attempt is still running and can be followed from this process."""

    def find(self, plan, attempt: int) -> AttemptHandle | None:
        """An attempt started by a supervisor that died before recording who runs it (``None``: never started)."""

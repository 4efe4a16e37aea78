"""Backends start, poll, signal and end attempts. They are the only code with side effects
on processes; everything they run comes from a :class:`~orchestrator.plan.LaunchPlan`."""
from __future__ import annotations

from .base import AttemptHandle, Backend


def get_backend(name: str) -> Backend:
    if name == "local":
        from .local import LocalBackend

        return LocalBackend()
    if name == "slurm":  # issue 4
        from .slurm import SlurmBackend

        return SlurmBackend()
    raise ValueError(f"unknown backend {name!r}")


__all__ = ["AttemptHandle", "Backend", "get_backend"]

"""Backends start, poll, signal and end attempts. They are the only code with side effects
on processes; everything they run comes from a :class:`~orchestrator.plan.LaunchPlan`."""
from __future__ import annotations

from .base import AttemptHandle, Backend


def get_backend(name: str) -> Backend:
    if name == "local":
        from .local import LocalBackend

        return LocalBackend()
    if name == "slurm":  # issue 11: attempts are job steps of the allocation the supervisor runs in
        import os

        from .slurm.steps import SlurmStepBackend

        if not os.environ.get("SLURM_JOB_ID"):
            raise ValueError("a SLURM job is supervised inside its allocation (orchestrator.supervise.in_allocation), "
                             "not from a login node")
        return SlurmStepBackend(os.environ["SLURM_JOB_ID"])
    raise ValueError(f"unknown backend {name!r}")


__all__ = ["AttemptHandle", "Backend", "get_backend"]

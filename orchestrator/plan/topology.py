"""What the submitting machine offers (read by :func:`orchestrator.plan.inputs.detect_topology`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    """Visible accelerators and CPU cores of the machine the job launches from."""

    gpus: int
    cpus: int
    hostname: str = "localhost"
    gpu_memory_gib: float | None = None  # issue 6: smallest visible GPU's memory (memory-aware plan)
    liger_installed: bool = False        # issue 6: liger-kernel importable (the plan's `liger: auto`)

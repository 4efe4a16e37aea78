"""What the submitting machine offers: detected once, then passed to pure planning code."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    """Visible accelerators and CPU cores of the machine the job launches from."""

    gpus: int
    cpus: int
    hostname: str = "localhost"
    gpu_memory_gib: float | None = None  # issue 6: smallest visible GPU's memory (memory-aware plan)
    liger_installed: bool = False        # issue 6: liger-kernel importable (the plan's `liger: auto`)


def detect_topology() -> Topology:
    """Count GPUs with torch (a no-op on CPU-only builds) and usable CPU cores."""
    physical, memory = 0, 0
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) not in ("", "-1"):
        import torch

        if torch.cuda.is_available():
            # device_count already honours CUDA_VISIBLE_DEVICES.
            physical = torch.cuda.device_count()
            if physical:
                memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(physical))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    import importlib.util

    return Topology(gpus=physical, cpus=cpus, hostname=socket.gethostname(),
                    gpu_memory_gib=round(memory / 2**30, 2) if physical else None,
                    liger_installed=importlib.util.find_spec("liger_kernel") is not None)

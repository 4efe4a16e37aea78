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


def detect_topology() -> Topology:
    """Count GPUs with torch (a no-op on CPU-only builds) and usable CPU cores."""
    physical = 0
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) not in ("", "-1"):
        import torch

        if torch.cuda.is_available():
            # device_count already honours CUDA_VISIBLE_DEVICES.
            physical = torch.cuda.device_count()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Topology(gpus=physical, cpus=cpus, hostname=socket.gethostname())

"""``launch.performance``: the switches of the plan's fast defaults (validation only).

What each switch does and how the plan decides ``auto`` is in :mod:`orchestrator.plan.performance`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .schema import closest

SWITCHES = ("packing", "attention", "activation_checkpointing", "cpu_offload", "micro_batch", "fused_adamw",
            "liger", "compile")
SAFETY_MARGIN = 0.10       # fraction of GPU memory kept free (the default of launch.performance.safety_margin)


@dataclass(frozen=True)
class PerformanceSettings:
    """``launch.performance``: ``auto`` (the plan decides), ``true`` or ``false`` per switch."""

    packing: bool | str = "auto"
    attention: str = "auto"                        # auto, or an attn_implementation name (sdpa, eager, ...)
    activation_checkpointing: bool | str = "auto"
    cpu_offload: bool | str = "auto"
    micro_batch: bool | str = "auto"               # false: never change per_device_train_batch_size
    fused_adamw: bool | str = "auto"
    liger: bool | str = "auto"
    compile: bool | str = "auto"
    gpu_memory_gib: float | str = "auto"           # auto: what the topology detected
    safety_margin: float = SAFETY_MARGIN    # fraction of GPU memory kept free

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_performance(raw: Any) -> tuple[PerformanceSettings, list[str]]:
    """Validate ``launch.performance``; every problem with its key path."""
    problems: list[str] = []
    if raw is None:
        return PerformanceSettings(), problems
    if not isinstance(raw, dict):
        return PerformanceSettings(), [f"launch.performance: expected a mapping, got {type(raw).__name__}"]
    known = {f.name for f in fields(PerformanceSettings)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"launch.performance.{key}"
        if key not in known:
            hint = closest(str(key), known)
            problems.append(f"{path}: unknown key" + (f" (did you mean '{hint}'?)" if hint else
                                                      f"; valid: {sorted(known)}"))
        elif key == "attention":
            if not isinstance(value, str) or not value:
                problems.append(f"{path}: expected 'auto' or an attention implementation name, got {value!r}")
            else:
                values[key] = value
        elif key == "gpu_memory_gib":
            if value != "auto" and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                problems.append(f"{path}: expected 'auto' or a number of GiB > 0, got {value!r}")
            else:
                values[key] = value if value == "auto" else float(value)
        elif key == "safety_margin":
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 0.9):
                problems.append(f"{path}: expected a fraction in [0, 0.9), got {value!r}")
            else:
                values[key] = float(value)
        elif value != "auto" and not isinstance(value, bool):
            problems.append(f"{path}: expected auto, true or false, got {value!r}")
        else:
            values[key] = value
    return PerformanceSettings(**values), problems

"""``launch.checkpoint``: how often a job saves (issue 12).

``every: 500`` (or ``"500 steps"``) saves every 500 optimizer steps (transformers' ``save_steps``);
``every: 30m`` (``s``, ``m`` or ``h``) saves at the first step boundary after 30 minutes since the
last save, agreed by every rank (the worker's callback). Either way the checkpoint is sharded
and written in the background where the plan allows (see ``orchestrator/worker/async_save.py``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_STEPS = re.compile(r"^\s*(\d+)\s*(?:steps?)?\s*$")
_TIME = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)\s*$")
_UNIT_S = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


@dataclass(frozen=True)
class CheckpointSettings:
    """``every_steps`` or ``every_s`` (or neither: the training config's own ``save_steps``)."""

    every_steps: int | None = None
    every_s: float | None = None


def parse_every(value: Any) -> tuple[int | None, float | None, str | None]:
    """``(steps, seconds, problem)`` of a ``launch.checkpoint.every`` value."""
    text = str(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    m = _STEPS.match(text) if text is not None else None
    if m and int(m.group(1)) > 0:
        return int(m.group(1)), None, None
    m = _TIME.match(text) if text is not None else None
    if m and float(m.group(1)) > 0:
        return None, float(m.group(1)) * _UNIT_S[m.group(2)], None
    return None, None, (f"launch.checkpoint.every: expected a number of steps (500, '500 steps') or a time "
                        f"('90s', '30m', '2h'), got {value!r}")


def parse_checkpoint(raw: Any, training: dict) -> tuple[CheckpointSettings, list[str]]:
    """Validate ``launch.checkpoint`` against the training config; the settings and every problem."""
    if raw is None:
        return CheckpointSettings(), []
    if not isinstance(raw, dict):
        return CheckpointSettings(), [f"launch.checkpoint: expected a mapping, got {type(raw).__name__}"]
    problems = [f"launch.checkpoint.{k}: unknown key (known: every)" for k in raw if k != "every"]
    if "every" not in raw:
        return CheckpointSettings(), problems
    steps, seconds, problem = parse_every(raw["every"])
    if problem:
        return CheckpointSettings(), [*problems, problem]
    if steps is not None and training.get("save_steps") not in (None, steps):
        problems.append(f"launch.checkpoint.every: {steps} steps, but save_steps is {training['save_steps']}: "
                        f"set one of them")
    if training.get("save_strategy") in ("no", "epoch") and steps is not None:
        problems.append(f"launch.checkpoint.every: a number of steps, but save_strategy is "
                        f"{training['save_strategy']!r}")
    return CheckpointSettings(every_steps=steps, every_s=seconds), problems

"""The ``launch:`` section: settings that belong to the orchestrator alone.

The worker never sees this section. Every key has a default, so a seed YAML
without ``launch:`` is valid. Validation collects every problem with its key path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .checkpoint import CheckpointSettings
from .performance import PerformanceSettings, parse_performance
from .schema import closest

BACKENDS = ("local", "slurm")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class RetryPolicy:
    """When and how often a failed attempt is retried (see docs in README)."""

    max_restarts: int = 3          # failed attempts retried per job (all backends, all failure classes)
    backoff_s: float = 5.0         # first wait before a retry; doubles each time
    backoff_max_s: float = 300.0
    max_no_progress: int = 2       # stop after this many consecutive attempts without a new checkpoint
    max_preemptions: int = 20      # graceful stops (preemption) have their own, separate budget
    restart_from_scratch: bool = False  # if checkpoints exist but none is usable: False = stop and say so


@dataclass(frozen=True)
class WatchdogPolicy:
    """Stall detection by the worker's phase (see supervise/watchdog.py).

    Training: no progress for max(stall_factor x median step time, stall_floor_s). A save or an
    evaluation: longer than max(phase_factor x the longest earlier one, save_floor_s/eval_floor_s).
    Any phase: no liveness heartbeat from rank 0 for heartbeat_timeout_s (a frozen process).
    """

    stall_factor: float = 10.0
    stall_floor_s: float = 300.0
    startup_timeout_s: float = 1800.0   # from attempt start to the first step
    save_floor_s: float = 1800.0        # a checkpoint save may always take this long
    eval_floor_s: float = 1800.0        # an evaluation too
    phase_factor: float = 3.0           # ... or this many times the longest earlier one
    heartbeat_timeout_s: float = 300.0  # rank 0's liveness beat (every few seconds) missing this long


@dataclass(frozen=True)
class LaunchSettings:
    name: str | None = None
    backend: str = "local"
    nproc_per_node: int | str = "auto"
    env: Mapping[str, str] = field(default_factory=dict)
    stop_signal: str = "SIGUSR2"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    watchdog: WatchdogPolicy = field(default_factory=WatchdogPolicy)
    slurm: Mapping[str, Any] = field(default_factory=dict)
    performance: PerformanceSettings = field(default_factory=PerformanceSettings)  # issue 6 (performance.py)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)     # issue 12 (checkpoint.py)
    script: str | None = None      # issue 13: the user's own training script instead of train_worker.py
    notify: Mapping[str, Any] = field(default_factory=dict)  # issue 19: who hears when the job ends (notify.py)


STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


def parse_launch(raw: Any) -> tuple[LaunchSettings, list[str]]:
    """Validate the ``launch:`` mapping; return the settings and every problem found."""
    problems: list[str] = []
    if raw is None:
        return LaunchSettings(), problems
    if not isinstance(raw, dict):
        return LaunchSettings(), [f"launch: expected a mapping, got {type(raw).__name__}"]
    known = {f.name for f in fields(LaunchSettings)}
    for key in raw:
        if key not in known:
            problems.append(_unknown("launch", key, known))
    values: dict[str, Any] = {}
    name = raw.get("name")
    if name is not None:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
            problems.append(f"launch.name: expected letters, digits, '.', '_' or '-' (at most 64), got {name!r}")
        else:
            values["name"] = name
    backend = raw.get("backend", "local")
    if backend not in BACKENDS:
        problems.append(f"launch.backend: expected one of {list(BACKENDS)}, got {backend!r}")
    else:
        values["backend"] = backend
    nproc = raw.get("nproc_per_node", "auto")
    if nproc != "auto" and not (isinstance(nproc, int) and not isinstance(nproc, bool) and nproc >= 1):
        problems.append(f"launch.nproc_per_node: expected 'auto' or an integer >= 1, got {nproc!r}")
    else:
        values["nproc_per_node"] = nproc
    values["env"] = _parse_env(raw.get("env"), problems)
    sig = raw.get("stop_signal", "SIGUSR2")
    if sig not in STOP_SIGNALS:
        problems.append(f"launch.stop_signal: expected one of {list(STOP_SIGNALS)}, got {sig!r}")
    else:
        values["stop_signal"] = sig
    script = raw.get("script")
    if script is not None and (not isinstance(script, str) or not script.strip()):
        problems.append(f"launch.script: expected the path of a Python training script, got {script!r}")
    elif script is not None:
        values["script"] = script
    values["retry"] = _parse_section("launch.retry", raw.get("retry"), RetryPolicy, problems)
    values["watchdog"] = _parse_section("launch.watchdog", raw.get("watchdog"), WatchdogPolicy, problems)
    # issue 4: launch.slurm and its profile from slurm_templates/ (config/slurm.py)
    from .slurm import parse_slurm

    values["slurm"], slurm_problems = parse_slurm(raw.get("slurm"), required=backend == "slurm")
    problems += slurm_problems
    # issue 6: fast defaults and their switches (config/performance.py, plan/performance.py)
    values["performance"], perf_problems = parse_performance(raw.get("performance"))
    problems += perf_problems
    # issue 19: a command and/or a webhook when the job ends (config/notify.py)
    from .notify import parse_notify

    values["notify"], notify_problems = parse_notify(raw.get("notify"))
    problems += notify_problems
    return LaunchSettings(**values), problems


def _parse_env(raw: Any, problems: list[str]) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"launch.env: expected a mapping of NAME: value, got {type(raw).__name__}")
        return {}
    env = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            problems.append(f"launch.env.{key}: not a valid environment variable name")
        elif isinstance(value, (dict, list)) or value is None:
            problems.append(f"launch.env.{key}: expected a string or number, got {type(value).__name__}")
        else:
            env[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def _parse_section(path: str, raw: Any, cls, problems: list[str]):
    """Parse a flat section of numbers/bools into dataclass ``cls``: types and ranges (>= 0)."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a mapping, got {type(raw).__name__}")
        return cls()
    spec = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in spec:
            problems.append(_unknown(path, key, spec))
            continue
        default = spec[key].default
        want = type(default)
        if want is bool:
            good = isinstance(value, bool)
        elif want is int:
            good = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        else:
            good = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        if not good:
            kind = "true or false" if want is bool else f"a {'whole ' if want is int else ''}number >= 0"
            problems.append(f"{path}.{key}: expected {kind}, got {value!r}")
        else:
            values[key] = float(value) if want is float else value
    return cls(**values)


def _unknown(path: str, key: Any, known) -> str:
    hint = closest(str(key), known)
    return f"{path}.{key}: unknown key" + (f" (did you mean '{hint}'?)" if hint else f"; valid: {sorted(known)}")

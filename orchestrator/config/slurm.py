"""The ``launch.slurm`` section and the named cluster profiles in ``slurm_templates/``.

A profile is a YAML file of the same keys (plus an optional ``description``); a config
names one with ``profile:`` and overrides any field (``extra`` is merged key by key).
:func:`parse_slurm` validates both and reports every problem at once, each with its key
path (``launch.slurm.time``, ``slurm_templates/gpu.yaml: partition``), unknown keys with
the closest valid name. It creates nothing and starts nothing.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from .schema import closest

ENV_TEMPLATES = "ORCHESTRATE_SLURM_TEMPLATES"   # extra profile folders (os.pathsep-separated)
BUILTIN_TEMPLATES = Path(__file__).resolve().parents[2] / "slurm_templates"

# key -> (default, description for errors). Everything a user may set.
FIELDS: dict[str, tuple[Any, str]] = {
    "profile": (None, "a profile name from slurm_templates/"),
    "partition": (None, "a partition name (or a comma-separated list)"),
    "time": (None, "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (or whole minutes)"),
    "nodes": (1, "a whole number >= 1"),
    "min_nodes": (None, "a whole number >= 1, at most nodes: go on with this many when nodes fail (default: nodes)"),
    "gpus_per_node": (0, "a whole number >= 0"),
    "cpus_per_task": (None, "a whole number >= 1 (one task per node runs torchrun and all its ranks)"),
    "mem": (None, "memory per node: a whole number with an optional K, M, G or T suffix (plain: MB)"),
    "account": (None, "an account name"),
    "qos": (None, "a QOS name"),
    "constraint": (None, "a node feature expression"),
    "exclusive": (False, "true or false"),
    "extra": ({}, "a mapping of further sbatch options: {option-name: value}"),
    "setup": ([], "a list of shell lines run before the job starts (module load, source env)"),
    "signal": ("USR2", "USR1, USR2 or TERM"),
    "signal_delay_s": (90, "seconds before the time limit, 1..65535"),
    "python": (None, "the Python interpreter on the compute nodes (default: the submitting one)"),
}
PROFILE_ONLY = ("description",)
SIGNALS = ("USR1", "USR2", "TERM")

_NAME = re.compile(r"^[A-Za-z0-9_.,+-]+$")
_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,&|\[\]*:()!+-]+$")
_MEM = re.compile(r"^(\d+)([KMGT]?)B?$", re.IGNORECASE)
_OPTION = re.compile(r"^[a-z][a-z0-9_-]*$")
_TIME_FORMS = (
    (re.compile(r"^(\d+)$"), ("m",)),
    (re.compile(r"^(\d+):(\d{1,2})$"), ("m", "s")),
    (re.compile(r"^(\d+):(\d{1,2}):(\d{1,2})$"), ("h", "m", "s")),
    (re.compile(r"^(\d+)-(\d{1,2})$"), ("d", "h")),
    (re.compile(r"^(\d+)-(\d{1,2}):(\d{1,2})$"), ("d", "h", "m")),
    (re.compile(r"^(\d+)-(\d{1,2}):(\d{1,2}):(\d{1,2})$"), ("d", "h", "m", "s")),
)
# sbatch options orchestrate sets itself: they have their own key, or must not be changed.
MANAGED_OPTIONS = {
    "nodes": "nodes", "time": "time", "partition": "partition", "account": "account", "qos": "qos",
    "constraint": "constraint", "exclusive": "exclusive", "mem": "mem", "gpus-per-node": "gpus_per_node",
    "cpus-per-task": "cpus_per_task", "signal": "signal", "job-name": None, "ntasks": None,
    "ntasks-per-node": None, "output": None, "error": None, "open-mode": None, "requeue": None,
    "no-requeue": None, "no-kill": None, "kill-on-invalid-dep": None, "array": None, "wrap": None, "export": None,
}


def parse_time(value: Any) -> tuple[int | None, str | None]:
    """SLURM time limit -> ``(seconds, None)`` or ``(None, problem)``; an int means minutes."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None, f"expected {FIELDS['time'][1]}, got {value!r}"
    text = str(value).strip()
    for pattern, units in _TIME_FORMS:
        m = pattern.match(text)
        if not m:
            continue
        parts = dict(zip(units, map(int, m.groups())))
        if len(units) > 1 and (parts.get("s", 0) > 59 or (parts.get("m", 0) > 59 and units[0] != "m")
                               or (parts.get("h", 0) > 23 and units[0] == "d")):
            break
        seconds = parts.get("d", 0) * 86400 + parts.get("h", 0) * 3600 + parts.get("m", 0) * 60 + parts.get("s", 0)
        if seconds <= 0:
            return None, f"must be longer than 0, got {value!r}"
        return seconds, None
    return None, f"expected {FIELDS['time'][1]}, got {value!r}"


def time_minutes(seconds: int) -> int:
    """Whole minutes for sbatch ``--time`` (SLURM rounds up to minutes too)."""
    return max(1, math.ceil(seconds / 60))


def template_dirs(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where profiles are looked up: ``$ORCHESTRATE_SLURM_TEMPLATES`` first, then the built-in folder."""
    env = os.environ if environ is None else environ
    extra = [Path(p) for p in (env.get(ENV_TEMPLATES) or "").split(os.pathsep) if p]
    return extra + [BUILTIN_TEMPLATES]


def available_profiles(dirs: list[Path] | None = None) -> dict[str, Path]:
    """``{name: file}`` of every profile; an earlier folder wins over a later one."""
    found: dict[str, Path] = {}
    for d in reversed(dirs if dirs is not None else template_dirs()):
        if d.is_dir():
            found.update({p.stem: p for p in sorted(d.glob("*.yaml"))})
    return found


def load_profile(name: str, dirs: list[Path] | None = None) -> tuple[dict, Path | None, list[str]]:
    """``(raw mapping, file, problems)`` of profile ``name``."""
    profiles = available_profiles(dirs)
    if name not in profiles:
        hint = closest(name, profiles)
        return {}, None, [f"launch.slurm.profile: no profile {name!r}" + (f" (did you mean '{hint}'?)" if hint else "")
                          + f"; available: {sorted(profiles) or 'none'} (folders: slurm_templates/, ${ENV_TEMPLATES})"]
    path = profiles[name]
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        return {}, path, [f"{path}: cannot be read as YAML: {exc}"]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return {}, path, [f"{path}: expected a mapping of key: value"]
    return data, path, []


def parse_slurm(raw: Any, *, required: bool, dirs: list[Path] | None = None) -> tuple[dict, list[str]]:
    """Validate ``launch.slurm`` (and its profile); return the merged settings and every problem.

    ``required``: the job runs on SLURM, so settings it cannot run without (a time limit)
    must be present. The result is a plain, JSON-serialisable dict with every key of
    :data:`FIELDS` plus ``time_min`` (the limit in whole minutes, what sbatch gets).
    """
    problems: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return defaults(), [f"launch.slurm: expected a mapping, got {type(raw).__name__}"]
    merged: dict[str, Any] = {}
    time_given = raw.get("time") is not None
    name = raw.get("profile")
    if name is not None:
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(f"launch.slurm.profile: expected a profile name, got {name!r}")
        else:
            data, path, found = load_profile(name, dirs)
            problems += found
            time_given = time_given or data.get("time") is not None
            if path is not None and not found:
                where = f"slurm_templates/{path.name}" if path.parent == BUILTIN_TEMPLATES else str(path)
                merged = _check_fields(data, f"{where}:", problems, profile=True)
    own = _check_fields(raw, "launch.slurm.", problems, profile=False)
    extra = {**merged.get("extra", {}), **own.get("extra", {})}
    settings = {**defaults(), **merged, **own, "extra": extra, "profile": name}
    if settings.get("min_nodes") is not None and settings["min_nodes"] > settings["nodes"]:
        problems.append(f"launch.slurm.min_nodes: {settings['min_nodes']} is more than launch.slurm.nodes "
                        f"({settings['nodes']})")
    if settings["time"] is not None:
        seconds, _ = parse_time(settings["time"])
        settings["time_min"] = time_minutes(seconds) if seconds else None
    elif required and not time_given:
        problems.append("launch.slurm.time: required for backend slurm (the job's time limit, e.g. 04:00:00 or "
                        "2-00:00:00); set it here or in the profile")
    return settings, problems


def defaults() -> dict[str, Any]:
    """Every key at its default (fresh mutable values)."""
    out = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
           for k, (v, _) in FIELDS.items()}
    out["time_min"] = None
    return out


def _check_fields(raw: dict, prefix: str, problems: list[str], *, profile: bool) -> dict[str, Any]:
    """Type/format checks of one mapping (config section or profile file)."""
    out: dict[str, Any] = {}
    known = set(FIELDS) - ({"profile"} if profile else set()) | (set(PROFILE_ONLY) if profile else set())
    for key, value in raw.items():
        path = f"{prefix}{key}" if prefix.endswith(".") else f"{prefix} {key}"
        if key not in known:
            hint = closest(str(key), known)
            problems.append(f"{path}: unknown key" + (f" (did you mean '{hint}'?)" if hint
                                                      else f"; valid: {sorted(known)}"))
            continue
        if key in ("profile", "description"):
            continue
        if key == "extra":
            found, norm = _check_extra(value, path)
            problems += found
            out[key] = norm
            continue
        problem, norm = _check_value(key, value, path)
        if problem:
            problems.append(problem)
        else:
            out[key] = norm
    return out


def _check_value(key: str, value: Any, path: str) -> tuple[str | None, Any]:
    want = FIELDS[key][1]
    bad = f"{path}: expected {want}, got {value!r}"
    if value is None:
        return None, FIELDS[key][0]
    if key == "time":
        _, problem = parse_time(value)
        return (f"{path}: {problem}" if problem else None), (str(value).strip() if not problem else None)
    if key in ("nodes", "min_nodes", "gpus_per_node", "cpus_per_task", "signal_delay_s"):
        low, high = {"gpus_per_node": 0, "signal_delay_s": 1}.get(key, 1), 65535
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        return (None, value) if ok else (bad, None)
    if key == "exclusive":
        return (None, value) if isinstance(value, bool) else (bad, None)
    if key == "mem":
        m = _MEM.match(str(value)) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
        return (None, f"{m.group(1)}{m.group(2).upper()}") if m else (bad, None)
    if key in ("partition", "account", "qos"):
        return (None, value) if isinstance(value, str) and _NAME.match(value) else (bad, None)
    if key == "constraint":
        return (None, value) if isinstance(value, str) and _CONSTRAINT.match(value) else (bad, None)
    if key == "signal":
        sig = value.upper().removeprefix("SIG") if isinstance(value, str) else None
        return (None, sig) if sig in SIGNALS else (bad, None)
    if key == "python":
        ok = isinstance(value, str) and value.strip() and "\n" not in value
        return (None, value.strip()) if ok else (bad, None)
    if key == "setup":
        lines = [value] if isinstance(value, str) else value
        if not isinstance(lines, list) or not all(isinstance(x, str) and "\n" not in x for x in lines):
            return f"{path}: expected {want} (one line per item), got {value!r}", None
        return None, list(lines)
    raise AssertionError(key)


def _abbreviates(name: str) -> str | None:
    """The option orchestrate sets that ``name`` abbreviates (sbatch, like getopt_long, takes any unique
    prefix of a long option: ``requeu``, ``sig`` or ``no-k`` would silently override ``--requeue``,
    ``--signal`` or ``--no-kill``), or ``None``."""
    if len(name) < 2:
        return None
    hits = [m for m in MANAGED_OPTIONS if m.startswith(name)]
    return min(hits, key=len) if hits else None


def _check_extra(value: Any, path: str) -> tuple[list[str], dict[str, Any]]:
    if value is None:
        return [], {}
    if not isinstance(value, dict):
        return [f"{path}: expected {FIELDS['extra'][1]}, got {value!r}"], {}
    out: dict[str, Any] = {}
    problems: list[str] = []
    for opt, v in value.items():
        name = str(opt).lstrip("-").replace("_", "-")
        if not _OPTION.match(name):
            problems.append(f"{path}.{opt}: not an sbatch option name")
        elif name in MANAGED_OPTIONS or _abbreviates(name):
            full = name if name in MANAGED_OPTIONS else _abbreviates(name)
            own = MANAGED_OPTIONS[full]
            why = (f"use launch.slurm.{own}" if own else
                   "--export would strip the job's environment (srun then loses PATH)" if full == "export" else
                   f"orchestrate sets --{full} itself")
            alias = "" if full == name else f"sbatch reads it as --{full}, "
            problems.append(f"{path}.{opt}: not allowed here ({alias}{why})")
        elif v is False or v is None or isinstance(v, (dict, list)) or "\n" in str(v):
            problems.append(f"{path}.{opt}: expected a string, a number or true, got {v!r}")
        else:
            out[name] = v if v is True else str(v)
    return problems, out

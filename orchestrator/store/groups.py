"""Sweep groups (issue 19): one record per group, and each job's claim on a slot of its group.

``$ORCHESTRATE_HOME/groups/<group id>.json`` is written once, when the sweep is submitted: its
points in order (each a job id, the swept keys and their values, the job's readable suffix), how
many of its jobs may run at once on this machine and which GPUs each slot gives its job. Each job
of a group says which slot it holds in ``<run dir>/slot.json``; a claim counts as long as the
job has not ended (its processes may still run while nobody supervises it). Claims are made under
the group's lock file, ``groups/<group id>.lock``, so two waiting jobs never take the same slot.
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import JobError
from ..worker import channel

GROUPS_DIR = "groups"
CLAIM_FILE = "slot.json"


@dataclass(frozen=True)
class Point:
    """One job of a sweep: its id, the swept keys with their values, and its suffix (``lr-0.001``)."""

    job_id: str
    keys: dict[str, Any]
    suffix: str


@dataclass(frozen=True)
class Group:
    """A sweep: the jobs of its grid and how they share this machine."""

    id: str
    name: str
    created: float
    config_path: str
    backend: str
    keys: tuple[str, ...]                # the swept keys, in the order given
    overrides: tuple[str, ...]           # KEY=VALUE common to every point
    max_parallel: int                    # jobs running at once (local backend)
    parallel_why: str                    # where max_parallel came from
    ranks_per_job: int                   # GPUs (or CPU ranks) each job takes
    devices: tuple[str, ...] = ()        # the GPUs the slots share out (empty: a CPU plan)
    points: tuple[Point, ...] = field(default=())

    @property
    def job_ids(self) -> list[str]:
        return [p.job_id for p in self.points]

    def devices_for(self, slot: int) -> str | None:
        """``CUDA_VISIBLE_DEVICES`` of the job in ``slot`` (None on a CPU plan): slot k gets the k-th block
        of ``ranks_per_job`` GPUs (blocks wrap around when --max-parallel asks for more than there are)."""
        if not self.devices:
            return None
        n = len(self.devices)
        return ",".join(self.devices[(slot * self.ranks_per_job + k) % n] for k in range(min(self.ranks_per_job, n)))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["keys"], d["overrides"], d["devices"] = list(self.keys), list(self.overrides), list(self.devices)
        d["points"] = [asdict(p) for p in self.points]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Group":
        d = dict(d)
        d["points"] = tuple(Point(**p) for p in d.get("points", ()))
        for key in ("keys", "overrides", "devices"):
            d[key] = tuple(d.get(key, ()))
        return cls(**d)


def groups_dir(home: Path) -> Path:
    return Path(home) / GROUPS_DIR


def write_group(home: Path, group: Group) -> Path:
    """Write a new group's record (refuses to overwrite one)."""
    path = groups_dir(home) / f"{group.id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise FileExistsError(f"{path}: the group exists already")
    channel.write_json_atomic(path, group.to_json())
    return path


def read_group(home: Path, group_id: str) -> Group | None:
    data = channel.read_json(groups_dir(home) / f"{group_id}.json")
    return Group.from_json(data) if isinstance(data, dict) else None


def resolve_group(home: Path, ref: str) -> Group:
    """The group whose id is ``ref`` or starts with it (like job ids); :class:`JobError` if none or several."""
    try:
        names = sorted(p[:-5] for p in os.listdir(groups_dir(home)) if p.endswith(".json"))
    except FileNotFoundError:
        names = []
    ids = [ref] if ref in names else [n for n in names if n.startswith(ref)]
    if not ids:
        raise JobError(f"no group '{ref}' in {groups_dir(home)} (a sweep's group id is printed when it is "
                       "submitted; orchestrate list shows each job's group)")
    if len(ids) > 1:
        raise JobError(f"'{ref}' matches {len(ids)} groups: {', '.join(ids)}; type more of the id")
    group = read_group(home, ids[0])
    if group is None:
        raise JobError(f"group {ids[0]}: its record in {groups_dir(home)} cannot be read")
    return group


@contextmanager
def group_lock(home: Path, group_id: str) -> Iterator[None]:
    """Exclusive, for claiming a slot (held for milliseconds)."""
    path = groups_dir(home) / f"{group_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_claim(run_dir) -> dict | None:
    """The slot the job holds (``{"slot", "devices", "time"}``), if it has taken one."""
    data = channel.read_json(Path(run_dir) / CLAIM_FILE)
    return data if isinstance(data, dict) and isinstance(data.get("slot"), int) else None


def write_claim(run_dir, slot: int, devices: str | None) -> dict:
    record = {"slot": slot, "devices": devices, "time": time.time()}
    channel.write_json_atomic(Path(run_dir) / CLAIM_FILE, record)
    return record


def drop_claim(run_dir) -> None:
    """Forget the job's slot (it ended, and runs again: it queues anew)."""
    (Path(run_dir) / CLAIM_FILE).unlink(missing_ok=True)

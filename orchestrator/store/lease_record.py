"""The lease's files: who holds a job (:class:`Owner`), one generation's record, and the exclusive create.

Kept apart from :mod:`.lease` (taking, renewing, judging the lease), which re-exports what callers use.
``<run_dir>/lease/%08d.json``: one file per generation, the newest holds; written complete (temporary
file, fsync) and put in place by ``os.link`` (exclusive, also on NFS) or, for a renewal, ``os.replace``.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import psutil

from ..errors import JobError
from ..worker import channel
from .liveness import namespace_id, same_process_table

LEASE_DIR = channel.LEASE_DIR
ENV_LEASE_S = "ORCHESTRATE_LEASE_S"   # the lease duration (tests and chaos runs shorten it)
DEFAULT_LEASE_S = 20.0
RENEWALS_PER_LEASE = 6                # renew every sixth of the lease: two may fail before the fence trips
KEEP_GENERATIONS = 3
NO_LEASE_GRACE_S = 60.0
# Test-only fault (bench/chaos.py): "eexist_after_link" makes the exclusive create report EEXIST although
# its link succeeded, as a retransmitted NFS LINK does when the server's first reply was lost.
ENV_LEASE_FAULT = "ORCHESTRATE_LEASE_FAULT"


def lease_duration(environ=None) -> float:
    """``$ORCHESTRATE_LEASE_S`` or the default (seconds)."""
    env = os.environ if environ is None else environ
    try:
        value = float(env.get(ENV_LEASE_S, DEFAULT_LEASE_S))
    except ValueError:
        return DEFAULT_LEASE_S
    return value if value > 0 else DEFAULT_LEASE_S


@dataclass(frozen=True)
class Owner:
    """Who holds a lease: host, PID and that process's start time, plus a random token.

    ``ns``: the boot and PID namespace the PID belongs to (PIDs compare only within one);
    ``where``: the allocation the holder runs in (``slurm:<job id>``), if any.
    """

    host: str
    pid: int
    start_time: float
    token: str
    ns: str = ""
    where: str = ""

    @classmethod
    def me(cls) -> "Owner":
        """This process."""
        pid = os.getpid()
        slurm = os.environ.get("SLURM_JOB_ID")
        return cls(socket.gethostname(), pid, process_start_time(pid) or 0.0, secrets.token_hex(8), namespace_id(),
                   f"slurm:{slurm}" if slurm else "")

    def is_local(self) -> bool:
        """The holder's PID is in this host's process table (same host name, boot and PID namespace)."""
        return same_process_table(self.host, self.ns)

    def process_alive(self) -> bool:
        """Only meaningful when :meth:`is_local`: the PID runs and started when the owner did."""
        return process_start_time(self.pid) == self.start_time

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def process_start_time(pid: int) -> float | None:
    """A live process's start time (``None`` if it is gone or a zombie)."""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p.create_time()
    except psutil.Error:
        return None


@dataclass(frozen=True)
class LeaseRecord:
    """One generation of the lease as written on disk.

    ``acquired``/``renewed`` are the holder's wall clock, for people to read; nobody judges expiry
    by them. ``beat`` counts renewals (a change another host can see). ``continues``: attempts this
    generation took over running (their ranks are not fenced by it, see ``worker/fence.py``).
    """

    gen: int
    owner: Owner
    acquired: float
    renewed: float
    duration_s: float
    released: bool = False
    beat: int = 0
    continues: tuple[int, ...] = field(default=())

    def heartbeat_age(self, now: float | None = None) -> float:
        """By the holder's clock against ours: for display only (another host's clock may be off)."""
        return max(0.0, (time.time() if now is None else now) - self.renewed)

    def sight_key(self) -> str:
        """What changes at every renewal (the holder's time stamp only as an opaque mark: a record of 0.2 has no beat)."""
        return f"{self.gen}:{self.beat}:{self.renewed!r}:{int(self.released)}:{self.owner.token}"

    def dead_here(self) -> bool:
        """Released, or held by a process of this host's process table that is gone (known at once)."""
        return self.released or (self.owner.is_local() and not self.owner.process_alive())

    def describe(self, now: float | None = None) -> str:
        """``pid 123 on host (heartbeat 2 s ago)``."""
        return f"{self.owner.describe()} (heartbeat {self.heartbeat_age(now):.0f} s ago)"

    def to_json(self) -> dict:
        d = asdict(self)
        d["continues"] = list(self.continues)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "LeaseRecord":
        known = {f.name for f in fields(cls)}
        owner = {k: v for k, v in d["owner"].items() if k in {f.name for f in fields(Owner)}}
        values = {k: v for k, v in d.items() if k in known}
        return cls(**{**values, "owner": Owner(**owner), "continues": tuple(d.get("continues") or ())})


class LeaseBusy(JobError):
    """Somebody else holds the lease; ``holder`` says who."""

    def __init__(self, holder: LeaseRecord):
        self.holder = holder
        super().__init__(f"supervised by {holder.describe()}")


class LeaseLost(JobError):
    """This process no longer holds the lease: stop acting, touch nothing (a :class:`JobError`: a command that
    meets it says why and exits 2, never with a traceback)."""


def _dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / LEASE_DIR


def _gen_path(run_dir, gen: int) -> Path:
    return _dir(run_dir) / channel.LEASE_FILE.format(gen=gen)


def newest_generation(run_dir) -> int:
    """The newest generation number on disk (0: the lease was never taken)."""
    try:
        names = os.listdir(_dir(run_dir))
    except FileNotFoundError:
        return 0
    gens = [int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()]
    return max(gens, default=0)


def _read_gen(run_dir, gen: int) -> LeaseRecord | None:
    try:
        return LeaseRecord.from_json(json.loads(_gen_path(run_dir, gen).read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def read_lease(run_dir) -> LeaseRecord | None:
    """The newest generation's record, or ``None`` if the lease was never taken."""
    gen = newest_generation(run_dir)
    return _read_gen(run_dir, gen) if gen else None   # None mid-replace: a reader retries at its next poll


def _temp(run_dir, record: LeaseRecord) -> Path:
    d = _dir(run_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = d / f".{record.gen:08d}.{record.owner.token}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record.to_json(), f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _create_exclusive(run_dir, record: LeaseRecord) -> bool:
    """Create generation ``record.gen`` complete, or return False if another holder created it first.

    EEXIST does not always mean "somebody else": NFS retransmits a LINK whose reply was lost, and
    the retransmission fails with EEXIST although the first one succeeded. The file then holds our
    own token, which is the proof that we won.
    """
    tmp = _temp(run_dir, record)
    target = _gen_path(run_dir, record.gen)
    try:
        os.link(tmp, target)
        if os.environ.get(ENV_LEASE_FAULT) == "eexist_after_link":
            raise FileExistsError(17, "File exists (injected: a retransmitted NFS LINK)", str(target))
        channel.fsync_dir(_dir(run_dir))
        return True
    except FileExistsError:
        there = _read_gen(run_dir, record.gen)
        if there is not None and there.owner.token == record.owner.token:
            channel.fsync_dir(_dir(run_dir))
            return True
        return False
    finally:
        tmp.unlink(missing_ok=True)

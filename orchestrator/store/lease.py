"""One owner per job: a lease kept in the job's run directory, taken by compare-and-set.

The lease is a sequence of generation files, ``<run_dir>/lease/<gen>.json``; the newest one
is the lease. Taking it means creating the next generation's file exclusively (``os.link``
of a complete temporary file: atomic, also on NFS), which only one contender can do, and
only when the newest generation is released, expired, or held by a process of this host
that is gone. The holder renews by rewriting its own generation's file from a thread of
its own (:meth:`Lease.keep_alive`), so no blocking call in the supervisor loop can starve
it. The generation number is the fencing token: every state write carries it (the ledger
refuses writes with an older one) and every signal is preceded by :meth:`Lease.check`,
which fails once a newer generation exists or the holder could not renew in time. A
holder that lost the lease stops acting and exits without touching the job.

Files in the run directory, not the ledger, because the run directory is the job's truth
on a shared filesystem, where SQLite must not be written from two hosts. Liveness is
judged by host-aware identity (host, PID, process start time) and heartbeat age; a PID is
only ever checked on its own host.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import psutil

LEASE_DIR = "lease"
ENV_LEASE_S = "ORCHESTRATE_LEASE_S"   # the lease duration (tests and chaos runs shorten it)
DEFAULT_LEASE_S = 20.0
KEEP_GENERATIONS = 3
NO_LEASE_GRACE_S = 60.0


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
    """Who holds a lease: host, PID and that process's start time, plus a random token."""

    host: str
    pid: int
    start_time: float
    token: str

    @classmethod
    def me(cls) -> "Owner":
        """This process."""
        pid = os.getpid()
        return cls(socket.gethostname(), pid, process_start_time(pid) or 0.0, secrets.token_hex(8))

    def is_local(self) -> bool:
        return self.host == socket.gethostname()

    def process_alive(self) -> bool:
        """Only meaningful on the owner's host: the PID runs and started when the owner did."""
        return process_start_time(self.pid) == self.start_time


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
    """One generation of the lease as written on disk."""

    gen: int
    owner: Owner
    acquired: float
    renewed: float
    duration_s: float
    released: bool = False

    def heartbeat_age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.renewed)

    def alive(self, now: float | None = None) -> bool:
        """Held: not released, renewed within its duration, and (on this host) its process still runs."""
        if self.released or self.heartbeat_age(now) > self.duration_s:
            return False
        return self.owner.process_alive() if self.owner.is_local() else True

    def describe(self, now: float | None = None) -> str:
        """``pid 123 on host (heartbeat 2 s ago)``."""
        return f"pid {self.owner.pid} on {self.owner.host} (heartbeat {self.heartbeat_age(now):.0f} s ago)"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "LeaseRecord":
        return cls(**{**d, "owner": Owner(**d["owner"])})


class LeaseBusy(Exception):
    """Somebody else holds the lease; ``holder`` says who."""

    def __init__(self, holder: LeaseRecord):
        self.holder = holder
        super().__init__(f"supervised by {holder.describe()}")


class LeaseLost(Exception):
    """This process no longer holds the lease: stop acting, touch nothing."""


def _dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / LEASE_DIR


def _gen_path(run_dir, gen: int) -> Path:
    return _dir(run_dir) / f"{gen:08d}.json"


def newest_generation(run_dir) -> int:
    """The newest generation number on disk (0: the lease was never taken)."""
    try:
        names = os.listdir(_dir(run_dir))
    except FileNotFoundError:
        return 0
    gens = [int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()]
    return max(gens, default=0)


def read_lease(run_dir) -> LeaseRecord | None:
    """The newest generation's record, or ``None`` if the lease was never taken."""
    gen = newest_generation(run_dir)
    if not gen:
        return None
    try:
        return LeaseRecord.from_json(json.loads(_gen_path(run_dir, gen).read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None  # being replaced right now: a reader retries at its next poll


def _temp(run_dir, record: LeaseRecord) -> Path:
    d = _dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{record.gen:08d}.{record.owner.token}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "w") as f:
        json.dump(record.to_json(), f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_exclusive(run_dir, record: LeaseRecord) -> bool:
    """Create generation ``record.gen`` complete, or return False if it exists already."""
    tmp = _temp(run_dir, record)
    try:
        os.link(tmp, _gen_path(run_dir, record.gen))
        _fsync_dir(_dir(run_dir))
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


class Lease:
    """A lease this process holds. ``wall``/``clock`` are injectable for tests."""

    def __init__(self, run_dir, record: LeaseRecord, *, wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic):
        self.run_dir = Path(run_dir)
        self.record = record
        self.wall, self.clock = wall, clock
        self._renewed_at = clock()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def gen(self) -> int:
        """The fencing token: every write and signal of the holder carries it."""
        return self.record.gen

    @property
    def token(self) -> str:
        return self.record.owner.token

    @classmethod
    def acquire(cls, run_dir, *, owner: Owner | None = None, duration_s: float | None = None,
                handoff_token: str | None = None, wall: Callable[[], float] = time.time,
                clock: Callable[[], float] = time.monotonic) -> "Lease":
        """Take the lease, or raise :class:`LeaseBusy` naming the holder.

        ``handoff_token``: the current holder's token, given to the process it hands the job to
        (SIGHUP of a foreground submit, ``--detach``): that process may take a live lease.
        """
        owner = owner or Owner.me()
        duration = duration_s or lease_duration()
        for _ in range(5):
            current = read_lease(run_dir)
            if current is None and newest_generation(run_dir):
                time.sleep(0.05)  # the newest file is being replaced: read it again
                continue
            now = wall()
            handed = handoff_token is not None and current is not None and current.owner.token == handoff_token
            if current is not None and current.alive(now) and not handed:
                raise LeaseBusy(current)
            record = LeaseRecord(gen=(current.gen if current else 0) + 1, owner=owner, acquired=now, renewed=now,
                                 duration_s=duration)
            if _create_exclusive(run_dir, record):
                lease = cls(run_dir, record, wall=wall, clock=clock)
                lease._prune()
                return lease
        current = read_lease(run_dir)
        if current is not None:
            raise LeaseBusy(current)
        raise LeaseLost(f"{_dir(run_dir)}: could not take the lease")

    def superseded(self) -> LeaseRecord | None:
        """The newer generation that replaced this one, if any."""
        if newest_generation(self.run_dir) == self.gen:
            return None
        return read_lease(self.run_dir) or self.record

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this process still holds the lease (before every action)."""
        if self._lost:
            raise LeaseLost(self._lost)
        newer = self.superseded()
        if newer is not None:
            self._lost = f"taken over by {newer.describe()}"
            raise LeaseLost(self._lost)

    @property
    def lost(self) -> str | None:
        """Why the lease was lost (``None`` while held)."""
        return self._lost

    def renew(self) -> None:
        """Rewrite this generation with a fresh time; raise :class:`LeaseLost` if it was taken or is too old."""
        with self._lock:
            if self._lost:
                raise LeaseLost(self._lost)
            since = self.clock() - self._renewed_at
            if since > self.record.duration_s * 0.75:
                # Others may already see it expired: stop acting rather than race them.
                self._lost = f"not renewed for {since:.0f} s (lease {self.record.duration_s:.0f} s)"
                raise LeaseLost(self._lost)
            self.check()
            record = replace(self.record, renewed=self.wall())
            tmp = _temp(self.run_dir, record)
            os.replace(tmp, _gen_path(self.run_dir, self.gen))
            self.record = record
            self._renewed_at = self.clock()

    def keep_alive(self, interval_s: float | None = None) -> "Lease":
        """Renew from a daemon thread every ``interval_s`` (default a fifth of the duration)."""
        interval = interval_s or max(0.2, self.record.duration_s / 5)

        def loop():
            while not self._stop.wait(interval):
                try:
                    self.renew()
                except LeaseLost:
                    return
                except OSError:
                    continue  # a full disk or a flaky filesystem: try again; check() fails once too old
        self._thread = threading.Thread(target=loop, name="orchestrate-lease", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing (the lease then expires unless released)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def release(self) -> None:
        """Stop renewing and mark the lease released, if this process still holds it."""
        self.stop()
        with self._lock:
            if self._lost or self.superseded() is not None:
                return
            record = replace(self.record, released=True, renewed=self.wall())
            try:
                os.replace(_temp(self.run_dir, record), _gen_path(self.run_dir, self.gen))
            except OSError:
                return  # expires by itself
            self.record = record
            self._lost = "released"

    def _prune(self) -> None:
        for gen in range(max(1, self.gen - KEEP_GENERATIONS * 4), self.gen - KEEP_GENERATIONS + 1):
            _gen_path(self.run_dir, gen).unlink(missing_ok=True)


@dataclass(frozen=True)
class SupervisorHealth:
    """What ``status`` shows about a job's supervisor (from the lease; no PID of another host is probed)."""

    alive: bool
    host: str | None = None
    pid: int | None = None
    heartbeat_age_s: float | None = None
    released: bool = False

    def missing(self, created: float, now: float | None = None) -> bool:
        """No supervisor holds the job (of an unfinished job created at ``created``): it needs ``resume``.

        A job created a moment ago may not have taken its lease yet (NO_LEASE_GRACE_S).
        """
        if self.alive:
            return False
        return self.pid is not None or (time.time() if now is None else now) - created > NO_LEASE_GRACE_S

    def to_json(self) -> dict:
        return {"alive": self.alive, "host": self.host, "pid": self.pid,
                "heartbeat_age_s": None if self.heartbeat_age_s is None else round(self.heartbeat_age_s, 1)}


def supervisor_health(run_dir, now: float | None = None) -> SupervisorHealth:
    """The job's supervisor as its lease tells: alive, or gone (never started, released, expired or dead)."""
    record = read_lease(run_dir)
    if record is None:
        return SupervisorHealth(alive=False)
    return SupervisorHealth(alive=record.alive(now), host=record.owner.host, pid=record.owner.pid,
                            heartbeat_age_s=record.heartbeat_age(now), released=record.released)


def unsupervised(job, health: SupervisorHealth, now: float | None = None) -> bool:
    """An unfinished job nobody supervises, which ``orchestrate resume`` should take over.

    A SLURM job waiting for its allocation (PENDING, or RESUMING after a requeue) has no supervisor
    yet by design: the allocation's batch step will take the lease when it starts.
    """
    if job.state.is_terminal:
        return False
    if job.backend == "slurm" and job.state.value in ("PENDING", "RESUMING"):
        return False
    return health.missing(job.created, now)

"""One owner per job: a lease kept in the job's run directory, taken by compare-and-set.

The lease is a sequence of generation files, ``<run_dir>/lease/<gen>.json``; the newest one
is the lease. Taking it means creating the next generation's file exclusively (``os.link``
of a complete temporary file: atomic, also on NFS), which only one contender can do, and
only when the newest generation is released, expired, or held by a process of this host
that is gone. The holder renews by rewriting its own generation's file from a thread of
its own (:meth:`Lease.keep_alive`), so no blocking call in the supervisor loop can starve
it. The generation number is the fencing token: every state write carries it (the ledger
refuses writes with an older one), every signal and destructive step is preceded by
:meth:`Lease.check`, which fails once a newer generation exists *or the holder's own last
renewal is older than half the lease* (a SIGSTOP, a frozen VM or a stalled fsync: others
may soon judge it expired), and the ranks get it as ``ORCHESTRATE_LEASE_GEN``. A holder
that lost the lease stops acting and exits without touching the job.

Expiry is judged on the reader's own clock (:mod:`.liveness`): a lease is expired once this
host has seen no renewal of it for its duration, whatever time stamps the holder writes (a
20 s clock difference between hosts changes nothing). Only a holder of this host and PID
namespace may be found dead at once, from the process table.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .lease_record import (  # noqa: F401 - re-exported: callers import the lease's names from here
    DEFAULT_LEASE_S,
    ENV_LEASE_FAULT,
    ENV_LEASE_S,
    KEEP_GENERATIONS,
    LEASE_DIR,
    NO_LEASE_GRACE_S,
    RENEWALS_PER_LEASE,
    LeaseBusy,
    LeaseLost,
    LeaseRecord,
    Owner,
    _create_exclusive,
    _dir,
    _gen_path,
    _temp,
    lease_duration,
    newest_generation,
    process_start_time,
    read_lease,
)
from .liveness import Sightings, boottime, sightings_for, watch


def judge_holder(run_dir, *, wait_s: float = 0.0, fresh: bool = False, sightings: Sightings | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> tuple[LeaseRecord | None, bool | None]:
    """``(newest record, alive)``: is the job's lease held? Watches it for at most ``wait_s``.

    ``alive`` is ``False`` when nobody holds it (never taken, released, a holder of this host that is
    gone, or no renewal seen for its duration on this host's clock), ``True`` when a renewal was
    seen within its duration, ``None`` when that is not known yet (seen for less than its duration).
    ``fresh``: only a renewal seen during this call counts (see :func:`.liveness.watch`).
    """
    sightings = sightings or sightings_for(run_dir)
    state: dict = {}

    def read() -> str | None:
        for _ in range(5):
            rec = read_lease(run_dir)
            if rec is not None or not newest_generation(run_dir):
                break
            time.sleep(0.05)   # the newest file is being replaced: read it again
        state["rec"] = rec
        if rec is None or rec.dead_here():
            return None
        return rec.sight_key()

    current = read_lease(run_dir)
    window = current.duration_s if current is not None else DEFAULT_LEASE_S
    alive, _ = watch(read, f"lease:{Path(run_dir).absolute()}", window, sightings, wait_s=wait_s, fresh=fresh,
                     sleep=sleep)
    return state.get("rec"), alive


class Lease:
    """A lease this process holds. ``wall``/``clock`` are injectable for tests."""

    def __init__(self, run_dir, record: LeaseRecord, *, wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = boottime):
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
                handoff_token: str | None = None, wait_s: float = 0.0, continues: tuple[int, ...] = (),
                sightings: Sightings | None = None, wall: Callable[[], float] = time.time,
                clock: Callable[[], float] = boottime, sleep: Callable[[float], None] = time.sleep) -> "Lease":
        """Take the lease, or raise :class:`LeaseBusy` naming the holder.

        A holder is judged on this host's clock (:func:`judge_holder`): ``wait_s`` is how long this
        call may watch a lease whose holder it knows nothing about yet (a resume waits up to the
        lease's duration; without waiting, such a lease counts as held). ``handoff_token``: the
        current holder's token, given to the process it hands the job to (SIGHUP of a foreground
        submit, ``--detach``): that process may take a live lease. ``continues``: attempts this
        holder takes over running (their ranks are not fenced by the new generation).
        """
        owner = owner or Owner.me()
        duration = duration_s or lease_duration()
        for _ in range(5):
            current, alive = judge_holder(run_dir, wait_s=wait_s, fresh=wait_s > 0, sightings=sightings, sleep=sleep)
            if current is None and newest_generation(run_dir):
                time.sleep(0.05)  # the newest file is being replaced: read it again
                continue
            handed = handoff_token is not None and current is not None and current.owner.token == handoff_token
            if current is not None and alive is not False and not handed:
                raise LeaseBusy(current)
            now = wall()
            record = LeaseRecord(gen=(current.gen if current else 0) + 1, owner=owner, acquired=now, renewed=now,
                                 duration_s=duration, continues=tuple(sorted(set(continues))))
            if _create_exclusive(run_dir, record):
                lease = cls(run_dir, record, wall=wall, clock=clock)
                lease._prune()
                return lease
            wait_s = 0.0   # somebody else took it just now: a change we saw, so it is held
        current = read_lease(run_dir)
        if current is not None:
            raise LeaseBusy(current)
        newest = _gen_path(run_dir, newest_generation(run_dir))
        raise LeaseLost(f"could not take the lease: its newest generation {newest} stayed unreadable")

    def superseded(self) -> LeaseRecord | None:
        """The newer generation that replaced this one, if any."""
        if newest_generation(self.run_dir) == self.gen:
            return None
        return read_lease(self.run_dir) or self.record

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this process still holds the lease (before every action).

        Held means: no newer generation exists, and this holder's own last renewal is younger than
        half the lease. Past that, another host that saw no renewal may take the lease before this
        one could renew again, so nothing may be done on its strength any more.
        """
        if self._lost:
            raise LeaseLost(self._lost)
        since = self.clock() - self._renewed_at
        if since > self.record.duration_s / 2:
            self._lost = (f"its own last renewal is {since:.0f} s old, more than half the {self.record.duration_s:.0f} s "
                          f"lease (the process was paused or its filesystem stalled)")
            raise LeaseLost(self._lost)
        newer = self.superseded()
        if newer is not None:
            self._lost = f"taken over by {newer.describe()}"
            raise LeaseLost(self._lost)

    @property
    def lost(self) -> str | None:
        """Why the lease was lost (``None`` while held)."""
        return self._lost

    def renew(self, **changes) -> None:
        """Rewrite this generation with a fresh time; raise :class:`LeaseLost` if it was taken or is too old."""
        with self._lock:
            self.check()
            record = replace(self.record, renewed=self.wall(), beat=self.record.beat + 1, **changes)
            tmp = _temp(self.run_dir, record)
            os.replace(tmp, _gen_path(self.run_dir, self.gen))
            self.record = record
            self._renewed_at = self.clock()

    def continue_attempts(self, *attempts: int) -> None:
        """Say that this generation took these running attempts over (their ranks are then not fenced)."""
        self.renew(continues=tuple(sorted(set(self.record.continues) | set(attempts))))

    def keep_alive(self, interval_s: float | None = None) -> "Lease":
        """Renew from a daemon thread every ``interval_s`` (default a sixth of the duration)."""
        interval = interval_s or max(0.2, self.record.duration_s / RENEWALS_PER_LEASE)

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
            record = replace(self.record, released=True, renewed=self.wall(), beat=self.record.beat + 1)
            try:
                os.replace(_temp(self.run_dir, record), _gen_path(self.run_dir, self.gen))
            except OSError:
                return  # expires by itself
            self.record = record
            self._lost = "released"

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _prune(self) -> None:
        for gen in range(max(1, self.gen - KEEP_GENERATIONS * 4), self.gen - KEEP_GENERATIONS + 1):
            _gen_path(self.run_dir, gen).unlink(missing_ok=True)


def hold(run_dir, *, wait_s: float = 0.0, continues: tuple[int, ...] = ()) -> Lease:
    """Take the lease and keep it alive from a thread (use as ``with hold(run_dir) as lease:``)."""
    return Lease.acquire(run_dir, wait_s=wait_s, continues=continues).keep_alive()


@dataclass(frozen=True)
class SupervisorHealth:
    """What ``status`` shows about a job's supervisor (from the lease, judged on this host's clock)."""

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
    """The job's supervisor as its lease tells: alive, or gone (never started, released, expired or dead).

    Gone only when this host knows it (released, its process of this host gone, or no renewal seen
    here for its duration); a holder this host has not watched long enough counts as alive.
    ``heartbeat_age_s`` is for display: the holder's time stamp against this host's clock.
    """
    record, alive = judge_holder(run_dir)
    if record is None:
        return SupervisorHealth(alive=False)
    return SupervisorHealth(alive=alive is not False, host=record.owner.host, pid=record.owner.pid,
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

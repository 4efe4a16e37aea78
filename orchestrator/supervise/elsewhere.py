"""An attempt seen from a host that cannot see its processes: its ranks' own beat and end record.

A login node shares the home with other login nodes; a job's attempt may run on any of them. A host
may probe and signal only the processes of its own process table (host name, boot and PID namespace:
``attempts/<n>/launch.json``). For an attempt started elsewhere, what every host can read decides:

* its ranks **beat** while rank 0's ``heartbeat.json`` keeps changing, as seen on this host's clock
  (:mod:`orchestrator.store.liveness`); they are **silent** once no change was seen for the window;
* they have **ended** once rank 0 wrote its end record (``status.json``) or torchrun its ``agent.json``;
* they are asked to stop through the run directory (``requests/stop.json``): every attempt numbered
  up to the request's stops at its next step boundary, writing nothing more (``worker/fence.py``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..store.lease import lease_duration
from ..store.liveness import same_process_table, sightings_for, watch
from ..store.progress import read_heartbeat
from ..worker import channel

MIN_BEAT_WINDOW_S = 5 * channel.HEARTBEAT_S   # never judge a beat every 2 s on less than five of them


def beat_window(environ=None) -> float:
    """How long no change of rank 0's beat means the ranks are silent (dead, or paused)."""
    return max(MIN_BEAT_WINDOW_S, lease_duration(environ))


@dataclass(frozen=True)
class Place:
    """Where an attempt was started: its host and PID namespace (``None``: not known)."""

    host: str | None
    ns: str | None

    @property
    def here(self) -> bool:
        """This host's process table holds the attempt's processes (an unknown place counts as here)."""
        return self.host is None or same_process_table(self.host, self.ns)


def place(plan, record) -> Place:
    """Where attempt ``record`` was started: its launch record, else the host the ledger recorded."""
    launched = channel.read_json(plan.paths.launch_record(record.n)) or {}
    return Place(launched.get("host") or record.host, launched.get("ns"))


def ended(attempt_dir: str | Path) -> bool:
    """Rank 0's end record or torchrun's exit record is there: the ranks have ended."""
    adir = Path(attempt_dir)
    names = (channel.STATUS_FILE, channel.AGENT_RECORD_FILE)
    return any((adir / n).exists() for n in names) or any(
        p.exists() for n in names for p in adir.glob(f"nodes/*/{n}"))


def ranks_beat(run_dir, attempt_dir: str | Path, *, wait_s: float = 0.0, window_s: float | None = None,
               fresh: bool = False) -> bool | None:
    """``True`` while rank 0's beat changes (seen on this host's clock), ``False`` once ended or silent for
    the window, ``None`` when watching ended before that was known (at most ``wait_s``). ``fresh``: only a
    beat seen during this call counts (a command about to act on it)."""
    adir = Path(attempt_dir)

    def read() -> str | None:
        if ended(adir):
            return None
        beat = read_heartbeat(adir)
        return "none" if beat is None else f"{beat.get('time')}:{beat.get('step')}:{beat.get('phase')}"

    alive, _ = watch(read, f"beat:{adir.absolute()}", window_s or beat_window(), sightings_for(run_dir),
                     wait_s=wait_s, fresh=fresh)
    return alive


def request_stop(run_dir, attempt: int, reason: str) -> None:
    """Ask every attempt numbered up to ``attempt`` to stop at its next step, writing nothing more."""
    from ..store import requests

    old = requests.pending(run_dir, channel.STOP_REQUEST) or {}
    upto = max(int(old.get("attempt") or 0), int(attempt))
    requests.make_request(run_dir, channel.STOP_REQUEST, attempt=upto, reason=reason)


def wait_until_stopped(run_dir, attempt_dir: str | Path, timeout_s: float, poll_s: float = 0.5) -> bool:
    """Wait until the ranks have ended or fallen silent; ``False`` if they still beat after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while True:
        beat = ranks_beat(run_dir, attempt_dir, wait_s=min(poll_s, max(0.0, end - time.monotonic())))
        if beat is False:
            return True
        if time.monotonic() >= end:
            return False


def runs_elsewhere_message(job, record, where: Place, doing: str) -> str:
    """What a host that does not own the running attempt says instead of acting."""
    return (f"{job.id}: attempt {record.n} still runs on {where.host} (its ranks beat) and this host ({doing}) "
            f"cannot see its processes; on {where.host} run: orchestrate resume {job.id} (to supervise it) or "
            f"orchestrate cancel {job.id}; from here, orchestrate cancel {job.id} stops it through the run directory")

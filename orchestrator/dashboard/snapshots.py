"""Snapshots of jobs from the ledger and their run directories, read cheaply and cached.

:class:`SnapshotSource` is the dashboard's only reader. It keeps one incremental
progress follower per job between frames; for the table a follower starts near the
end of the file (the table needs the last records only), the detail view reads the
whole file once. What never changes is read once: each job's retry budget and
max_steps from ``plan.json``, the first error of an ended attempt, and the progress
summary of a finished job, which is also kept in ``$ORCHESTRATE_HOME/cache/dashboard.json``
(keyed by the job's state and the time its ledger row last changed) so that
``status --once`` over a thousand finished jobs reads one small file instead of a
thousand progress files.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import fields
from pathlib import Path
from typing import Callable

from ..store.goodput_read import GoodputReader, read_final
from ..store.lease import supervisor_health
from ..store.ledger import Job, Ledger
from ..store.logs import FirstError, first_error
from ..store.paths import RunPaths
from ..store.progress import ProgressFollower, ProgressState, read_heartbeat
from ..worker import channel
from .render import Snapshot

TAIL_BYTES = 8 * 1024        # ~25 records: the sparkline, the rate window, the last step
CKPT_SCAN_BYTES = 4 << 20    # how far back to look for the last checkpoint record
CACHE_VERSION = 3
FULL_REREAD_S = 30.0         # live views re-read the whole ledger this often ...
SLACK_S = 10.0               # ... and in between the rows changed since the last frame minus this
_KEEP_LOSSES = 16   # the table's sparkline
_KEEP_EVALS = 64
GOODPUT_REFRESH_S = 5.0   # a running job's account is recomputed at most this often (and 20x its cost)
_SCAN_BACK = (b'"event": "checkpoint"', b'"event": "eval"')   # records the table needs even when older than the tail
_STATE_FIELDS = [f.name for f in fields(ProgressState)]


def tail_follower(path: Path, tail_bytes: int = TAIL_BYTES) -> ProgressFollower:
    """A follower positioned at the first whole line of the last ``tail_bytes`` of ``path``.

    The last checkpoint and eval records are looked up further back (bounded) if the tail has none.
    """
    follower = ProgressFollower(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        return follower
    if size <= tail_bytes:
        return follower
    with open(path, "rb") as f:
        f.seek(size - tail_bytes - 1)
        chunk = f.read(tail_bytes + 1)
        follower.offset = size - tail_bytes + chunk.find(b"\n")   # just after the line that was cut
        for marker in _SCAN_BACK:
            if chunk.rfind(marker) < 0:
                _last_record(f, size - tail_bytes, follower, marker)
    return follower


def _last_record(f, end: int, follower: ProgressFollower, marker: bytes) -> None:
    pos = end
    while pos > 0 and end - pos < CKPT_SCAN_BYTES:
        start = max(0, pos - 256 * 1024)
        f.seek(start)
        chunk = f.read(pos - start + 1024)   # overlap: a record cut at the border
        hit = chunk.rfind(marker)
        if hit >= 0:
            line = chunk[chunk.rfind(b"\n", 0, hit) + 1:chunk.find(b"\n", hit) + 1]
            try:
                follower._apply(json.loads(line))   # sets the checkpoint fields (step is overwritten later)
            except ValueError:
                pass
            return
        pos = start


def _state_to_json(s: ProgressState) -> dict:
    d = {name: getattr(s, name) for name in _STATE_FIELDS}   # not asdict(): it deep-copies every loss
    d["losses"] = d["losses"][-_KEEP_LOSSES:]
    d["evals"] = d["evals"][-_KEEP_EVALS:]
    return d


def _state_from_json(d: dict) -> ProgressState:
    # losses stay [step, loss] lists (the renderers only unpack them); the rate is unused once a job ended
    return ProgressState(**{k: v for k, v in d.items() if k in _STATE_FIELDS and k not in ("rate_start", "rate_end")})


def _cache_key(job: Job) -> list:
    # A finished job's progress file no longer changes; resuming it changes its ledger row.
    return [job.state.value, job.updated]


class SnapshotSource:
    """Builds :class:`Snapshot` objects; one instance lives as long as a view."""

    def __init__(self, ledger: Ledger | None = None, *, cache_path: Path | None = None,
                 tail_bytes: int = TAIL_BYTES, clock: Callable[[], float] = time.time):
        self.ledger, self.tail_bytes, self.clock = ledger, tail_bytes, clock
        self._followers: dict[tuple[str, bool], ProgressFollower] = {}
        self._done: dict[tuple[str, bool], ProgressState] = {}    # finished jobs: never read again
        self._plans: dict[str, list] = {}
        self._errors: dict[tuple[str, int], FirstError | None] = {}
        self._goodput: dict[str, GoodputReader] = {}        # unfinished jobs: read on from where they were
        self._goodput_last: dict[str, tuple[float, float, dict]] = {}   # job -> (when, cost s, account)
        self._jobs: dict[str, Job] | None = None
        self._full_at = self._since = 0.0
        self._snaps: dict[str, Snapshot] = {}
        self.cache_path = cache_path
        self._cache: dict[str, dict] = {}
        self._dirty = False
        if cache_path is not None:
            data = channel.read_json(cache_path) or {}
            if data.get("version") == CACHE_VERSION and isinstance(data.get("jobs"), dict):
                self._cache = data["jobs"]

    @classmethod
    def for_ledger(cls, ledger: Ledger) -> "SnapshotSource":
        """A source with the persistent cache next to the ledger (``<home>/cache/dashboard.json``)."""
        return cls(ledger, cache_path=Path(ledger.path).parent / "cache" / "dashboard.json")

    def plan_info(self, job: Job) -> tuple[int | None, int | None]:
        """``(retry.max_restarts, max_steps)`` of the job's plan (read once: a plan never changes)."""
        restarts, steps, _ = self._plan(job)
        return restarts, steps

    def _plan(self, job: Job) -> list:
        """``[max_restarts, max_steps, overrides]`` of the job's plan, read once."""
        if job.id not in self._plans:
            cached = self._cache.get(job.id, {}).get("plan")
            if cached is None or len(cached) < 3:
                plan = channel.read_json(RunPaths(Path(job.run_dir)).plan) or {}
                restarts = (plan.get("retry") or {}).get("max_restarts")
                steps = (plan.get("worker_config") or {}).get("max_steps")
                cached = [restarts if isinstance(restarts, int) else None,
                          steps if isinstance(steps, int) and steps > 0 else None,
                          [str(o) for o in plan.get("overrides") or []]]
                if plan:
                    self._cache.setdefault(job.id, {})["plan"] = cached
                    self._dirty = True
            self._plans[job.id] = cached
        return self._plans[job.id]

    def _progress(self, job: Job, full: bool) -> ProgressState:
        key = (job.id, full)
        if not job.state.is_terminal:
            self._done.pop(key, None)       # resumed: what was read when it had ended is stale
        elif key in self._done:
            return self._done[key]
        cache_key = None
        if job.state.is_terminal and not full:
            cache_key = _cache_key(job)
            entry = self._cache.get(job.id, {})
            if key not in self._followers and entry.get("key") == cache_key and "progress" in entry:
                self._done[key] = _state_from_json(entry["progress"])
                return self._done[key]
        follower = self._followers.get(key)
        if follower is None:
            path = RunPaths(Path(job.run_dir)).progress
            follower = self._followers[key] = ProgressFollower(path) if full else tail_follower(path, self.tail_bytes)
        follower.poll()
        if job.state.is_terminal:
            self._done[key] = follower.state
            del self._followers[key]
            if cache_key is not None:
                self._cache.setdefault(job.id, {}).update(key=cache_key, progress=_state_to_json(follower.state))
                self._dirty = True
        return follower.state

    def goodput(self, job: Job, detail: bool = True) -> dict | None:
        """The job's goodput account (``Account.to_json()``), recomputed at a bounded rate while it runs.

        A finished job's comes from the cache or from the ``goodput.json`` its supervisor wrote at its
        end; without either (a job that ended before there was one), only the detail view computes it
        (then cached): the table of a thousand such jobs must not read every progress file.
        """
        if not job.state.is_terminal:
            now, last = self.clock(), self._goodput_last.get(job.id)
            if last is not None and now - last[0] < max(GOODPUT_REFRESH_S, 20 * last[1]):
                return last[2]
            reader = self._goodput.setdefault(job.id, GoodputReader(job.run_dir))
            t0 = time.monotonic()
            data = reader.account(job, now).to_json()
            self._goodput_last[job.id] = (now, time.monotonic() - t0, data)
            return data
        self._goodput.pop(job.id, None)
        self._goodput_last.pop(job.id, None)
        entry = self._cache.setdefault(job.id, {})
        if entry.get("goodput_key") != _cache_key(job) or "goodput" not in entry:
            data = read_final(job) or (GoodputReader(job.run_dir).account(job).to_json() if detail else None)
            if data is None:
                return None
            entry.update(goodput_key=_cache_key(job), goodput=data)
            self._dirty = True
            if detail:
                self.save()   # status JOB computed it: the table finds it from now on
        return entry["goodput"]

    def errors(self, job: Job) -> dict[int, FirstError]:
        """First error of each ended, failed attempt (read once per attempt)."""
        out = {}
        for a in job.attempts:
            if a.ended is None or a.failure in (None, "COMPLETED", "CANCELLED"):
                continue
            key = (job.id, a.n)
            if key not in self._errors:
                self._errors[key] = first_error(RunPaths(Path(job.run_dir)).attempt_dir(a.n))
            if self._errors[key] is not None:
                out[a.n] = self._errors[key]
        return out

    def snapshot(self, job: Job, detail: bool = False) -> Snapshot:
        """One job; ``detail`` reads its whole progress file (loss curve) and its errors."""
        restarts, steps, overrides = self._plan(job)
        log_dir = None
        if detail and job.attempts:
            log_dir = str(RunPaths(Path(job.run_dir)).rank_log_dir(job.attempts[-1].n))
        health = supervisor_health(job.run_dir) if detail or not job.state.is_terminal else None
        beat = None
        if job.attempts and not job.state.is_terminal:
            beat = read_heartbeat(RunPaths(Path(job.run_dir)).attempt_dir(job.attempts[-1].n))
        return Snapshot(job=job, progress=self._progress(job, detail), now=self.clock(), max_restarts=restarts,
                        planned_steps=steps, errors=self.errors(job) if detail else {}, log_dir=log_dir,
                        supervisor=health, heartbeat=beat, overrides=tuple(overrides), goodput=self.goodput(job, detail))

    def _ledger_jobs(self, incremental: bool) -> list[Job]:
        now = self.clock()
        if not incremental or self._jobs is None or now - self._full_at > FULL_REREAD_S:
            self._jobs = {j.id: j for j in self.ledger.jobs()}
            self._full_at = now
        else:
            self._jobs.update((j.id, j) for j in self.ledger.jobs_updated_since(self._since))
        self._since = now - SLACK_S
        return sorted(self._jobs.values(), key=lambda j: -j.created)

    def all(self, incremental: bool = False) -> list[Snapshot]:
        """Every job in the ledger, newest first; saves the persistent cache if it changed.

        ``incremental`` (live views): re-read only the ledger rows changed since the last
        call (with ``SLACK_S`` of overlap), and all of them every ``FULL_REREAD_S``.
        """
        snaps = []
        for job in self._ledger_jobs(incremental):
            prev = self._snaps.get(job.id)
            if prev is not None and prev.job is job and job.state.is_terminal:
                snaps.append(prev)    # unchanged and finished: nothing to recompute
                continue
            snap = self._snaps[job.id] = self.snapshot(job)
            snaps.append(snap)
        self.save()
        return snaps

    def one(self, job_id: str) -> Snapshot:
        """One job in detail, re-read from the ledger."""
        return self.snapshot(self.ledger.get(job_id), detail=True)

    def save(self) -> None:
        """Write the persistent cache if anything new went into it (best effort: a read-only home is fine)."""
        if not self._dirty or self.cache_path is None:
            return
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_name(f".{self.cache_path.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "jobs": self._cache}, separators=(",", ":")))
            os.replace(tmp, self.cache_path)
            self._dirty = False
        except OSError:
            pass

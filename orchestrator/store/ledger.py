"""The job ledger: an embedded SQLite database of jobs and their attempts.

SQLite gives atomic updates from several processes (the supervisor writes, the
dashboard and CLI read) with no server. WAL mode lets readers never block it.

Writes of a job's supervisor are *fenced*: they carry the supervisor's lease generation
(:mod:`orchestrator.store.lease`), and a write with an older generation than the newest
one the job has seen is refused with :class:`FencedOut`, so a supervisor that lost its
lease can never overwrite what its successor wrote. Attempts are written ahead: recorded
``STARTING`` before the backend starts them, then ``RUNNING`` with their process
identity (PID, its start time, host) or scheduler id, then ended.
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..states import JobState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    backend TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    run_dir TEXT NOT NULL,
    config_path TEXT NOT NULL,
    output_dir TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    max_steps INTEGER,
    distributed_type TEXT,
    supervisor_pid INTEGER,
    heartbeat REAL,
    message TEXT,
    fence INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_output_dir ON jobs(output_dir);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    n INTEGER NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    pid INTEGER,
    exit_code INTEGER,
    failure TEXT,
    resumed_from TEXT,
    start_step INTEGER,
    end_step INTEGER,
    gained_checkpoint INTEGER,
    message TEXT,
    status TEXT,
    pid_start REAL,
    host TEXT,
    external_id TEXT,
    PRIMARY KEY (job_id, n)
);
"""
# Columns added after 0.1: ledgers written by 0.1 get them on first open.
_MIGRATIONS = {
    "jobs": {"fence": "INTEGER NOT NULL DEFAULT 0"},
    "attempts": {"status": "TEXT", "pid_start": "REAL", "host": "TEXT", "external_id": "TEXT"},
}

# attempts.status: written ahead (STARTING) before the backend starts the attempt.
STARTING, RUNNING, ENDED = "STARTING", "RUNNING", "ENDED"


class FencedOut(Exception):
    """A write carried an older lease generation than the job has seen: its writer lost the lease."""


@dataclass
class AttemptRecord:
    """The ledger's record of one attempt of a job (one row of ``attempts``)."""

    job_id: str
    n: int
    started: float
    ended: float | None = None
    pid: int | None = None
    exit_code: int | None = None
    failure: str | None = None
    resumed_from: str | None = None
    start_step: int | None = None
    end_step: int | None = None
    gained_checkpoint: int | None = None
    message: str | None = None
    status: str | None = None        # STARTING, RUNNING or ENDED (None: written by 0.1)
    pid_start: float | None = None   # the agent process's start time: with pid and host, its identity
    host: str | None = None
    external_id: str | None = None   # the scheduler's id (SLURM job id)

    @property
    def is_open(self) -> bool:
        """Not ended: running, or started by a supervisor that died before recording its end."""
        return self.ended is None

    @property
    def steps_gained(self) -> int | None:
        if self.start_step is None or self.end_step is None:
            return None
        return self.end_step - self.start_step


@dataclass
class Job:
    """A job as the ledger knows it, with its attempts in order."""

    id: str
    name: str
    backend: str
    state: JobState
    created: float
    updated: float
    run_dir: str
    config_path: str
    output_dir: str
    step: int = 0
    max_steps: int | None = None
    distributed_type: str | None = None
    supervisor_pid: int | None = None
    heartbeat: float | None = None
    message: str | None = None
    fence: int = 0
    attempts: list[AttemptRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "attempts"}
        d["state"] = self.state.value
        d["attempts"] = [{**a.__dict__, "steps_gained": a.steps_gained} for a in self.attempts]
        return d


class Ledger:
    """Jobs and attempts in ``path`` (created on first use)."""

    _migrated: set[str] = set()   # ledgers brought up to date by this process

    def __init__(self, path: Path):
        self.path = Path(path)

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.executescript(_SCHEMA)
            if str(self.path) not in Ledger._migrated:
                _migrate(conn)
                Ledger._migrated.add(str(self.path))
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _fenced(self, job_id: str, fence: int | None) -> Iterator[sqlite3.Connection]:
        """A write transaction that first checks (and raises) the job's fence to ``fence``."""
        with self._conn() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                if fence is not None:
                    row = c.execute("SELECT fence FROM jobs WHERE id = ?", (job_id,)).fetchone()
                    if row is not None and row["fence"] > fence:
                        raise FencedOut(f"{job_id}: lease generation {fence} is older than {row['fence']}")
                    c.execute("UPDATE jobs SET fence = ? WHERE id = ? AND fence < ?", (fence, job_id, fence))
                yield c
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def create_job(self, *, job_id: str, name: str, backend: str, run_dir: str, config_path: str,
                   output_dir: str, max_steps: int | None = None) -> None:
        now = time.time()
        with self._conn() as c:
            c.execute(
                "INSERT INTO jobs (id, name, backend, state, created, updated, run_dir, config_path, "
                "output_dir, max_steps) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (job_id, name, backend, JobState.PENDING.value, now, now, run_dir, config_path, output_dir,
                 max_steps),
            )

    def update_job(self, job_id: str, *, fence: int | None = None, **fields: Any) -> None:
        """Set columns of a job; ``state`` may be a JobState. ``fence``: the writer's lease generation."""
        if not fields:
            return
        if isinstance(fields.get("state"), JobState):
            fields["state"] = fields["state"].value
        fields["updated"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._fenced(job_id, fence) as c:
            c.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def start_attempt(self, job_id: str, n: int, *, resumed_from: str | None, start_step: int,
                      fence: int | None = None, pid: int | None = None, status: str = STARTING) -> None:
        """Record attempt ``n`` (ahead of starting it: ``STARTING``, no PID yet)."""
        with self._fenced(job_id, fence) as c:
            c.execute(
                "INSERT INTO attempts (job_id, n, started, pid, resumed_from, start_step, status) "
                "VALUES (?,?,?,?,?,?,?)",
                (job_id, n, time.time(), pid, resumed_from, start_step, status),
            )

    def update_attempt(self, job_id: str, n: int, *, fence: int | None = None, **fields: Any) -> None:
        """Set columns of attempt ``n``; ``fence`` as for :meth:`update_job`."""
        if not fields:
            return
        if fields.get("ended") is not None:
            fields.setdefault("status", ENDED)
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._fenced(job_id, fence) as c:
            c.execute(f"UPDATE attempts SET {cols} WHERE job_id = ? AND n = ?", (*fields.values(), job_id, n))

    def get(self, job_id: str) -> Job | None:
        with self._conn() as c:
            row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            attempts = c.execute("SELECT * FROM attempts WHERE job_id = ? ORDER BY n", (job_id,)).fetchall()
        return _job(row, attempts)

    def find(self, prefix: str) -> list[str]:
        """Job ids equal to or starting with ``prefix`` (so users can type a short id)."""
        with self._conn() as c:
            # Not LIKE: it is case-insensitive and treats '_' (allowed in ids) as a wildcard.
            rows = c.execute("SELECT id FROM jobs WHERE substr(id, 1, ?) = ? ORDER BY created",
                             (len(prefix), prefix)).fetchall()
        ids = [r["id"] for r in rows]
        return [prefix] if prefix in ids else ids

    def jobs(self, states: list[JobState] | None = None, limit: int | None = None) -> list[Job]:
        """Jobs, newest first, with their attempts."""
        sql, args = "SELECT * FROM jobs", []
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args = [s.value for s in states]
        sql += " ORDER BY created DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._conn() as c:
            rows = c.execute(sql, args).fetchall()
            attempts = c.execute("SELECT * FROM attempts ORDER BY job_id, n").fetchall()
        by_job: dict[str, list] = {}
        for a in attempts:
            by_job.setdefault(a["job_id"], []).append(a)
        return [_job(r, by_job.get(r["id"], [])) for r in rows]

    def jobs_updated_since(self, since: float) -> list[Job]:
        """Jobs whose row changed at or after ``since`` (its ``updated`` time), with their attempts.

        Read-only; lets a live view re-read only what changed between two frames.
        """
        with self._conn() as c:
            rows = c.execute("SELECT * FROM jobs WHERE updated >= ? ORDER BY created DESC", (since,)).fetchall()
            attempts = c.execute("SELECT * FROM attempts WHERE job_id IN (SELECT id FROM jobs WHERE updated >= ?) "
                                 "ORDER BY job_id, n", (since,)).fetchall()
        by_job: dict[str, list] = {}
        for a in attempts:
            by_job.setdefault(a["job_id"], []).append(a)
        return [_job(r, by_job.get(r["id"], [])) for r in rows]

    def jobs_using_output_dir(self, output_dir: str) -> list[Job]:
        with self._conn() as c:
            rows = c.execute("SELECT * FROM jobs WHERE output_dir = ?", (output_dir,)).fetchall()
        return [_job(r, []) for r in rows]


def _migrate(conn: sqlite3.Connection) -> None:
    for table, columns in _MIGRATIONS.items():
        have = {r["name"] for r in conn.execute(f"PRAGMA table_info({table})")}
        for name, decl in columns.items():
            if name not in have:
                try:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
                except sqlite3.OperationalError as e:   # another process added it first
                    if "duplicate column" not in str(e):
                        raise


def _job(row: sqlite3.Row, attempts) -> Job:
    d = dict(row)
    d["state"] = JobState(d["state"])
    return Job(**d, attempts=[AttemptRecord(**dict(a)) for a in attempts])


def dumps(job: Job) -> str:
    return json.dumps(job.to_json(), indent=1, sort_keys=True)

"""The job ledger: an embedded SQLite database of jobs and their attempts.

SQLite gives atomic updates from several processes (the supervisor writes, the
dashboard and CLI read) with no server. WAL mode lets readers never block it.
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
    message TEXT
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
    PRIMARY KEY (job_id, n)
);
"""


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
    attempts: list[AttemptRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "attempts"}
        d["state"] = self.state.value
        d["attempts"] = [{**a.__dict__, "steps_gained": a.steps_gained} for a in self.attempts]
        return d


class Ledger:
    """Jobs and attempts in ``path`` (created on first use)."""

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
            yield conn
        finally:
            conn.close()

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

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Set columns of a job; ``state`` may be a JobState."""
        if not fields:
            return
        if isinstance(fields.get("state"), JobState):
            fields["state"] = fields["state"].value
        fields["updated"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._conn() as c:
            c.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def start_attempt(self, job_id: str, n: int, *, pid: int | None, resumed_from: str | None,
                      start_step: int) -> None:
        with self._conn() as c:
            c.execute(
                "INSERT INTO attempts (job_id, n, started, pid, resumed_from, start_step) VALUES (?,?,?,?,?,?)",
                (job_id, n, time.time(), pid, resumed_from, start_step),
            )

    def update_attempt(self, job_id: str, n: int, **fields: Any) -> None:
        if not fields:
            return
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._conn() as c:
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


def _job(row: sqlite3.Row, attempts) -> Job:
    d = dict(row)
    d["state"] = JobState(d["state"])
    return Job(**d, attempts=[AttemptRecord(**dict(a)) for a in attempts])


def dumps(job: Job) -> str:
    return json.dumps(job.to_json(), indent=1, sort_keys=True)

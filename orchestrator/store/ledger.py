"""The job ledger: each job's records in its run directory (the truth), and a per-host index.

Writes go to the job's files (:mod:`orchestrator.store.jobfiles`): atomic, fenced by the
writer's lease generation, readable from every host that sees the run directories. Reads of
one job read its files. Listing and finding jobs use an SQLite index of this host
(``<home>/index/<hostname>.db``), brought up to date from the files before each query (the
job files whose modification time changed since). So no SQLite database is ever written
from two hosts, a supervisor inside a SLURM allocation writes only files, and another login
node that sees the same run directories lists the same jobs. Delete the index and it is
rebuilt; it holds nothing the files do not.
"""
from __future__ import annotations

import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..states import JobState
from . import jobfiles
from .records import ATTEMPT_FIELDS, ENDED, JOB_FIELDS, RUNNING, STARTING, AttemptRecord, FencedOut, Job, dumps  # noqa: F401

# Where this host keeps its index, if not under the home (a home on a shared filesystem may want it on local disk).
ENV_INDEX = "ORCHESTRATE_INDEX"
INDEX_VERSION = 4          # the index is a cache: another version is dropped and rebuilt from the files
_ATTEMPT_COLS = ", ".join(ATTEMPT_FIELDS)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs ({", ".join(JOB_FIELDS)}, file_mtime INTEGER, PRIMARY KEY (id));
CREATE INDEX IF NOT EXISTS jobs_output_dir ON jobs(output_dir);
CREATE INDEX IF NOT EXISTS jobs_updated ON jobs(updated);
CREATE TABLE IF NOT EXISTS attempts ({_ATTEMPT_COLS}, PRIMARY KEY (job_id, n));
"""


class Ledger:
    """Jobs under ``runs`` (one run directory each), indexed in this host's database ``path``."""

    def __init__(self, path: Path, runs: Path | None = None):
        self.path = Path(path)
        if runs is None:  # <home>/index/<host>.db -> <home>/runs; <dir>/<name>.db -> <dir>/runs
            base = self.path.parent.parent if self.path.parent.name == "index" else self.path.parent
            runs = base / "runs"
        self.runs = Path(runs)

    @classmethod
    def for_home(cls, home: Path) -> "Ledger":
        """The ledger of an ``$ORCHESTRATE_HOME``: ``runs/`` and ``index/<hostname>.db``."""
        home = Path(home)
        _migrate_01(home)
        index = os.environ.get(ENV_INDEX) or home / "index" / f"{socket.gethostname()}.db"
        return cls(Path(index), home / "runs")

    # -- writes: to the job's files ----------------------------------------------------------
    def create_job(self, *, job_id: str, name: str, backend: str, run_dir: str, config_path: str,
                   output_dir: str, max_steps: int | None = None) -> None:
        if Path(run_dir) != self._run_dir(job_id):
            raise ValueError(f"{job_id}: its run directory must be {self._run_dir(job_id)}, got {run_dir}")
        now = time.time()
        jobfiles.create_job(Job(id=job_id, name=name, backend=backend, state=JobState.PENDING, created=now,
                                updated=now, run_dir=run_dir, config_path=config_path, output_dir=output_dir,
                                max_steps=max_steps))

    def update_job(self, job_id: str, *, fence: int | None = None, **fields: Any) -> None:
        """Set fields of a job; ``state`` may be a JobState. ``fence``: the writer's lease generation."""
        if not fields:
            return
        if isinstance(fields.get("state"), JobState):
            fields["state"] = fields["state"].value
        jobfiles.update_job(self._run_dir(job_id), fields, fence)

    def start_attempt(self, job_id: str, n: int, *, resumed_from: str | None, start_step: int,
                      fence: int | None = None, pid: int | None = None, status: str = STARTING,
                      **fields: Any) -> None:
        """Record attempt ``n`` (ahead of starting it: ``STARTING``, no PID yet)."""
        record = AttemptRecord(job_id=job_id, n=n, started=time.time(), pid=pid, resumed_from=resumed_from,
                               start_step=start_step, status=status, **fields)
        jobfiles.write_attempt(self._run_dir(job_id), record, fence)

    def update_attempt(self, job_id: str, n: int, *, fence: int | None = None, **fields: Any) -> None:
        """Set fields of attempt ``n``; ``fence`` as for :meth:`update_job`."""
        if fields:
            jobfiles.update_attempt(self._run_dir(job_id), n, fields, fence)

    def _run_dir(self, job_id: str) -> Path:
        return self.runs / job_id

    # -- reads -------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        """One job, from its files."""
        return jobfiles.read_job(self._run_dir(job_id))

    def find(self, prefix: str) -> list[str]:
        """Job ids equal to or starting with ``prefix`` (so users can type a short id)."""
        with self._index() as c:
            # Not LIKE: it is case-insensitive and treats '_' (allowed in ids) as a wildcard.
            rows = c.execute("SELECT id FROM jobs WHERE substr(id, 1, ?) = ? ORDER BY created",
                             (len(prefix), prefix)).fetchall()
        ids = [r["id"] for r in rows]
        return [prefix] if prefix in ids else ids

    def jobs(self, states: list[JobState] | None = None, limit: int | None = None,
             group: str | None = None) -> list[Job]:
        """Jobs, newest first, with their attempts (only those of sweep ``group``, if given)."""
        sql, args, where = "SELECT * FROM jobs", [], []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args = [s.value for s in states]
        if group:
            where.append("group_id = ?")
            args.append(group)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._index() as c:
            return _jobs(c, c.execute(sql, args).fetchall())

    def jobs_updated_since(self, since: float) -> list[Job]:
        """Jobs changed at or after ``since`` (their ``updated`` time), with their attempts (for live views)."""
        with self._index() as c:
            return _jobs(c, c.execute("SELECT * FROM jobs WHERE updated >= ? ORDER BY created DESC",
                                      (since,)).fetchall())

    def jobs_using_output_dir(self, output_dir: str) -> list[Job]:
        with self._index() as c:
            rows = c.execute("SELECT * FROM jobs WHERE output_dir = ?", (output_dir,)).fetchall()
        return [_job(r, []) for r in rows]

    # -- the index ---------------------------------------------------------------------------
    @contextmanager
    def _index(self) -> Iterator[sqlite3.Connection]:
        """This host's index, brought up to date with the job files first."""
        conn = self._connect()
        try:
            self._sync(conn)
            yield conn
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout=30000")
        if conn.execute("PRAGMA user_version").fetchone()[0] != INDEX_VERSION:
            conn.executescript("DROP TABLE IF EXISTS jobs; DROP TABLE IF EXISTS attempts;")
            conn.execute(f"PRAGMA user_version={INDEX_VERSION}")
        conn.executescript(_SCHEMA)
        return conn

    def _sync(self, conn: sqlite3.Connection) -> None:
        """Re-read the jobs whose file changed (by mtime), drop those whose run directory is gone."""
        known = {r["id"]: r["file_mtime"] for r in conn.execute("SELECT id, file_mtime FROM jobs")}
        seen, changed = set(), []
        try:
            entries = list(os.scandir(self.runs))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            try:
                mtime = os.stat(jobfiles.job_file(entry.path)).st_mtime_ns
            except (FileNotFoundError, NotADirectoryError):
                continue
            seen.add(entry.name)
            if known.get(entry.name) != mtime:
                changed.append((entry.path, mtime))
        gone = [job_id for job_id in known if job_id not in seen]
        if not changed and not gone:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            for job_id in gone:
                conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                conn.execute("DELETE FROM attempts WHERE job_id = ?", (job_id,))
            for path, mtime in changed:
                job = jobfiles.read_job(path)
                if job is not None:
                    _upsert(conn, job, mtime)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _upsert(conn: sqlite3.Connection, job: Job, mtime: int) -> None:
    row = job.row()
    cols = [*JOB_FIELDS, "file_mtime"]
    conn.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                 [row.get(k) for k in JOB_FIELDS] + [mtime])
    conn.execute("DELETE FROM attempts WHERE job_id = ?", (job.id,))
    for a in job.attempts:
        conn.execute(f"INSERT INTO attempts ({_ATTEMPT_COLS}) VALUES ({', '.join('?' * len(ATTEMPT_FIELDS))})",
                     [a.__dict__.get(k) for k in ATTEMPT_FIELDS])


def _jobs(conn: sqlite3.Connection, rows) -> list[Job]:
    ids = [r["id"] for r in rows]
    by_job: dict[str, list] = {}
    for a in conn.execute("SELECT * FROM attempts ORDER BY job_id, n"):
        if a["job_id"] in by_job or a["job_id"] in ids:
            by_job.setdefault(a["job_id"], []).append(a)
    return [_job(r, by_job.get(r["id"], [])) for r in rows]


def _job(row: sqlite3.Row, attempts) -> Job:
    return Job.from_json({k: row[k] for k in JOB_FIELDS}, [AttemptRecord.from_json(dict(a)) for a in attempts])


def _migrate_01(home: Path) -> None:
    """Ledgers of 0.1 kept the truth in ``<home>/ledger.db``: write it into the run directories, once."""
    old = home / "ledger.db"
    if not old.exists():
        return
    conn = sqlite3.connect(old, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        jobs = conn.execute("SELECT * FROM jobs").fetchall()
        attempts = conn.execute("SELECT * FROM attempts ORDER BY job_id, n").fetchall()
    except sqlite3.Error:
        jobs, attempts = [], []
    finally:
        conn.close()
    for row in jobs:
        run_dir = Path(row["run_dir"])
        if not run_dir.is_dir() or jobfiles.job_file(run_dir).exists():
            continue
        mine = [AttemptRecord.from_json(dict(a)) for a in attempts if a["job_id"] == row["id"]]
        for a in mine:
            a.status = a.status or (ENDED if a.ended is not None else RUNNING)
        job = Job.from_json(dict(row), mine)
        jobfiles.create_job(job)
        for a in mine:
            jobfiles.write_attempt(run_dir, a)
    os.replace(old, home / "ledger.db.0.1")

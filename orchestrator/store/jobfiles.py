"""A job's records as files in its run directory: the truth about the job.

``<run_dir>/ledger/job.json`` and ``<run_dir>/ledger/attempt-<n>.json``, each written
atomically (temporary file, fsync, rename). Files and not a database because the run
directory is the one place every host sees (a shared filesystem on a cluster, where SQLite
must never be written from two hosts): a supervisor inside a SLURM allocation writes them,
and any login node reads them. The SQLite ledger of each host is only an index rebuilt from
them (:mod:`orchestrator.store.ledger`).

Writes are fenced: a record carries the lease generation of its writer, and a write with an
older generation than the record's is refused (:class:`FencedOut`). One job's read-modify-
write cycles are serialised with a lock file on the job's folder; the lease already makes the
supervisor the only writer, the lock covers the CLI verbs that write beside it.
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..worker import channel
from .records import ENDED, AttemptRecord, FencedOut, Job

LEDGER_DIR = "ledger"
JOB_FILE = "job.json"
_ATTEMPT = "attempt-"


def ledger_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / LEDGER_DIR


def job_file(run_dir) -> Path:
    return ledger_dir(run_dir) / JOB_FILE


def attempt_file(run_dir, n: int) -> Path:
    return ledger_dir(run_dir) / f"{_ATTEMPT}{n}.json"


@contextmanager
def _locked(run_dir) -> Iterator[None]:
    d = ledger_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a filesystem without locks: the lease still makes one supervisor the only writer
        yield
    finally:
        os.close(fd)


def _check_fence(current: dict | None, fence: int | None) -> None:
    if fence is not None and current is not None and int(current.get("fence") or 0) > fence:
        raise FencedOut(f"{current.get('id') or current.get('job_id')}: lease generation {fence} is older than "
                        f"{current.get('fence')}")


def create_job(job: Job) -> None:
    """Write a new job's record; refuses to overwrite one."""
    path = job_file(job.run_dir)
    if path.exists():
        raise FileExistsError(f"{path}: the job exists already")
    with _locked(job.run_dir):
        channel.write_json_atomic(path, job.row())


def read_job(run_dir, with_attempts: bool = True) -> Job | None:
    """The job's record and (by default) its attempts, in order; ``None`` if it has none."""
    data = channel.read_json(job_file(run_dir))
    if not isinstance(data, dict):
        return None
    return Job.from_json(data, read_attempts(run_dir) if with_attempts else [])


def read_attempts(run_dir) -> list[AttemptRecord]:
    out = []
    d = ledger_dir(run_dir)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return out
    for name in names:
        if name.startswith(_ATTEMPT) and name.endswith(".json") and name[len(_ATTEMPT):-5].isdigit():
            data = channel.read_json(d / name)
            if isinstance(data, dict):
                out.append(AttemptRecord.from_json(data))
    return sorted(out, key=lambda a: a.n)


def update_job(run_dir, fields: dict[str, Any], fence: int | None = None) -> None:
    """Merge ``fields`` into the job's record (``updated`` is set); fenced by ``fence``."""
    with _locked(run_dir):
        current = channel.read_json(job_file(run_dir))
        if current is None:
            raise FileNotFoundError(f"{job_file(run_dir)}: no such job record")
        _check_fence(current, fence)
        new = {**current, **fields, "updated": time.time()}
        if fence is not None:
            new["fence"] = max(int(current.get("fence") or 0), fence)
        channel.write_json_atomic(job_file(run_dir), new)


def write_attempt(run_dir, record: AttemptRecord, fence: int | None = None) -> None:
    """A new attempt's record (written ahead, before the backend starts it)."""
    with _locked(run_dir):
        current = channel.read_json(job_file(run_dir))
        _check_fence(current, fence)
        if attempt_file(run_dir, record.n).exists():
            raise FileExistsError(f"attempt {record.n} of {record.job_id} is recorded already")
        channel.write_json_atomic(attempt_file(run_dir, record.n), record.__dict__)
        _touch_job(run_dir, current, fence)


def update_attempt(run_dir, n: int, fields: dict[str, Any], fence: int | None = None) -> None:
    """Merge ``fields`` into attempt ``n``'s record; fenced by ``fence``."""
    with _locked(run_dir):
        current = channel.read_json(job_file(run_dir))
        _check_fence(current, fence)
        record = channel.read_json(attempt_file(run_dir, n))
        if record is None:
            raise FileNotFoundError(f"{attempt_file(run_dir, n)}: no such attempt record")
        if fields.get("ended") is not None:
            fields = {"status": ENDED, **fields}
        channel.write_json_atomic(attempt_file(run_dir, n), {**record, **fields})
        _touch_job(run_dir, current, fence)


def _touch_job(run_dir, current: dict | None, fence: int | None) -> None:
    """An attempt changed: so did its job (readers notice changes by the job file alone)."""
    if current is None:
        return
    new = {**current, "updated": time.time()}
    if fence is not None:
        new["fence"] = max(int(current.get("fence") or 0), fence)
    channel.write_json_atomic(job_file(run_dir), new)

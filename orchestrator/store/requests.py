"""Requests to a job's supervisor, as files in its run directory (``requests/<kind>.json``).

``orchestrate cancel`` does not act behind a live supervisor's back: it writes a request
the lease holder acts on at its next poll (a second or less), wherever that supervisor
runs (another login node, inside a SLURM allocation), since the run directory is the one
place every host sees.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from ..worker import channel

REQUESTS_DIR = channel.REQUESTS_DIR
CHECKPOINT = channel.CHECKPOINT_REQUEST   # read by the worker: save at the next step boundary
CANCEL = "cancel"


def _path(run_dir, kind: str) -> Path:
    return Path(run_dir) / REQUESTS_DIR / f"{kind}.json"


def make_request(run_dir, kind: str, **fields) -> dict:
    """Write request ``kind`` (replacing an earlier one of the same kind)."""
    record = {"kind": kind, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid(), **fields}
    channel.write_json_atomic(_path(run_dir, kind), record)
    return record


def pending(run_dir, kind: str) -> dict | None:
    """The request of ``kind``, if one is there."""
    return channel.read_json(_path(run_dir, kind))


def clear(run_dir, kind: str, older_than: float | None = None) -> None:
    """Remove request ``kind`` (only if made before ``older_than``, when given)."""
    rec = pending(run_dir, kind)
    if rec is None:
        return
    if older_than is not None and float(rec.get("time") or 0) >= older_than:
        return
    _path(run_dir, kind).unlink(missing_ok=True)

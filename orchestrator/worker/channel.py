"""The file channel between the training worker and the orchestrator.

The worker never talks to the orchestrator through its logs. It writes:

* ``progress.jsonl`` in the run directory: one JSON object per line, appended by
  rank 0 (``event`` is ``start``, ``log``, ``checkpoint`` or ``end``);
* ``status.json`` in the attempt directory: the attempt's final record, written
  atomically (temp file + rename) so a reader never sees half of it;
* a marker file inside each checkpoint folder once every rank finished writing it.

Both sides import this module, so the names and formats live in one place.
It must stay free of heavy imports (the dashboard reads through it).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

ENV_RUN_DIR = "ORCHESTRATE_RUN_DIR"
ENV_ATTEMPT_DIR = "ORCHESTRATE_ATTEMPT_DIR"
ENV_ATTEMPT = "ORCHESTRATE_ATTEMPT"
ENV_JOB_ID = "ORCHESTRATE_JOB_ID"
# Set by the supervisor: the verified checkpoint to resume from, or "none" (start fresh).
ENV_RESUME_FROM = "ORCHESTRATE_RESUME_FROM"
AGENT_RECORD_FILE = "agent.json"
# Signals (besides SIGTERM) on which the worker stops gracefully: launch.stop_signal.
ENV_STOP_SIGNALS = "ORCHESTRATE_STOP_SIGNALS"

# Rank 0's liveness beat in the attempt directory, every HEARTBEAT_S and at each phase change:
# {"phase": one of PHASES, "since": epoch s the phase began, "time": epoch s of this beat, "step": int}.
HEARTBEAT_FILE = "heartbeat.json"
HEARTBEAT_S = 2.0
PHASES = ("setup", "loading", "training", "saving", "evaluating")
PROGRESS_FILE = "progress.jsonl"
STATUS_FILE = "status.json"
# Rank 0's record of the final model it saved (digests of every tensor, the trained logits; see
# worker/final_record.py), and the orchestrator's verdict on that folder (supervise/final_model.py):
# {"verified": bool, "reason": str|null, "folder": str|null, "started": s, "ended": s, "method": str,
#  "peak_rss_mb": float|null}.
FINAL_RECORD_FILE = "final_model.json"
FINAL_CHECK_FILE = "final_check.json"
CHECKPOINT_MARKER = ".orchestrate-complete"

# Values of status.json's "state": what the worker says about how its attempt ended.
WORKER_COMPLETED = "completed"
WORKER_FAILED = "failed"
WORKER_STOPPED = "stopped"  # graceful stop on a signal: checkpoint saved, resumable

# Exit status of every worker rank after a graceful stop (EX_TEMPFAIL): "stopped, resumable".
EXIT_STOPPED = 75
# ENV_RESUME_FROM's value meaning "start fresh, do not look for checkpoints".
RESUME_NONE = "none"
# Test-only fault injection in the worker: "hang|crash|exit|oom:RANK:STEP[:always]".
ENV_FAULT = "ORCHESTRATE_FAULT"
# launch.checkpoint.every as seconds: every rank agrees to save at the step boundary after it passed.
ENV_SAVE_EVERY_S = "ORCHESTRATE_SAVE_EVERY_S"
# <run_dir>/requests/<kind>.json: requests to a running job (store/requests.py writes them); the worker
# reads CHECKPOINT_REQUEST ("save at the next step boundary", `orchestrate checkpoint`).
REQUESTS_DIR = "requests"
CHECKPOINT_REQUEST = "checkpoint"
# requests/stop.json {"attempt": N, "reason": str, ...}: every attempt numbered N or less stops at its next step
# boundary and writes nothing more (no log, no checkpoint): another host ends an attempt it cannot signal.
STOP_REQUEST = "stop"
# The job's lease (store/lease.py): <run_dir>/lease/%08d.json, the newest generation holds. ORCHESTRATE_LEASE_GEN
# is the generation that started the attempt; a newer generation that does not list the attempt in its
# "continues" fences it (see worker/fence.py).
LEASE_DIR = "lease"
LEASE_FILE = "{gen:08d}.json"
ENV_LEASE_GEN = "ORCHESTRATE_LEASE_GEN"
# Test-only faults inside the save path: see support.SaveFault.
ENV_SAVE_FAULT = "ORCHESTRATE_SAVE_FAULT"
# Per-rank error record in the attempt directory: error-rank<R>.json.
ERROR_FILE_PREFIX = "error-rank"


def error_file_name(rank: int) -> str:
    """Name of rank ``rank``'s error record inside the attempt directory."""
    return f"{ERROR_FILE_PREFIX}{rank}.json"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` so that readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (files created or renamed in it) durable; a no-op where folders cannot be
    opened (some network filesystems refuse it: their create/rename is synchronous there)."""
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


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record as a single line; one ``write`` call so lines never interleave."""
    line = json.dumps(record, sort_keys=True, allow_nan=True) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line)
        f.flush()


def read_json(path: str | os.PathLike) -> dict | None:
    """Read a JSON file written by :func:`write_json_atomic`; ``None`` if absent or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, IsADirectoryError):
        return None


def iter_jsonl(path: str | os.PathLike, offset: int = 0) -> Iterator[tuple[dict, int]]:
    """Yield ``(record, next_offset)`` for each complete line from byte ``offset`` on.

    A last line without its newline is still being written and is left for the next
    call, which lets a follower poll the file incrementally and cheaply.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        f.seek(offset)
        for raw in f:
            if not raw.endswith(b"\n"):
                return
            offset += len(raw)
            try:
                yield json.loads(raw), offset
            except json.JSONDecodeError:
                continue


def read_progress(path: str | os.PathLike) -> list[dict]:
    """All complete records of a progress file."""
    return [rec for rec, _ in iter_jsonl(path)]

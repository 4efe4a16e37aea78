"""Checkpoints as both sides see them: the completion marker the worker writes, and the one
test of completeness the supervisor (and the worker, when it picks a resume point) applies.

A checkpoint counts only if the worker's completion marker is there and cheap checks agree
with it: ``trainer_state.json`` parses and its step matches the folder, every file the marker
lists exists with its recorded size and is non-empty, every safetensors file has a readable
header, and (marker format 2) every DCP folder whose shards are listed has its ``.metadata``
listed too. Reads only small files and headers.

The marker (format 2, written by :mod:`orchestrator.worker.commit`): rank 0 writes it from the
``(path, size)`` lists every rank reported for the files it wrote and fsynced, after checking
them against DCP's ``.metadata``; then it fsyncs the folder. Older markers (no ``format``: rank
0's own listing) stay readable and are verified the same way against their list.

There is one listing (:func:`list_checkpoints`, newest first) and one folder-name pattern.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from . import channel
from .channel import CHECKPOINT_MARKER, fsync_dir, read_json

TRAINER_STATE = "trainer_state.json"
MARKER_FORMAT = 2      # 2: the files every rank reported (gathered), checked against DCP's .metadata
DCP_METADATA = ".metadata"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class CheckpointCheck:
    path: Path
    step: int
    ok: bool
    reason: str = ""


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` folder, newest first."""
    out = []
    d = Path(output_dir)
    if not d.is_dir():
        return out
    for child in d.iterdir():
        m = _CKPT.match(child.name)
        if m and child.is_dir():
            out.append((int(m.group(1)), child))
    return sorted(out, reverse=True)


def verify_checkpoint(path: Path, step: int) -> CheckpointCheck:
    """Check one checkpoint folder; ``reason`` says what is wrong when not ``ok``."""
    def bad(reason: str) -> CheckpointCheck:
        return CheckpointCheck(path, step, False, reason)

    marker = read_json(path / CHECKPOINT_MARKER)
    if not isinstance(marker, dict):
        return bad("no completion marker (the save did not finish)")
    if marker.get("step") != step:
        return bad(f"marker says step {marker.get('step')}, folder says {step}")
    state = read_json(path / TRAINER_STATE)
    if not isinstance(state, dict):
        return bad("trainer_state.json missing or unreadable")
    if state.get("global_step") != step:
        return bad(f"trainer_state.json global_step {state.get('global_step')} != {step}")
    files = marker.get("files") or {}
    if not isinstance(files, dict) or not files:
        return bad("marker lists no files")
    for rel, size in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            return bad(f"{rel} is missing")
        actual = f.stat().st_size
        if actual != size or (actual == 0 and not rel.endswith((".json", ".txt"))):
            return bad(f"{rel} has {actual} bytes, expected {size}")
        if rel.endswith(".safetensors") and not _safetensors_header_ok(f):
            return bad(f"{rel}: safetensors header unreadable")
    if int(marker.get("format") or 1) >= 2:
        for folder in sorted({rel.rsplit("/", 1)[0] for rel in files if rel.endswith(".distcp") and "/" in rel}):
            if f"{folder}/{DCP_METADATA}" not in files:
                return bad(f"{folder}/{DCP_METADATA} is not in the marker's list")
    return CheckpointCheck(path, step, True)


def _safetensors_header_ok(f: Path) -> bool:
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n <= 0 or n > _MAX_HEADER:
                return False
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            return False
        size = f.stat().st_size
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + n + max(ends, default=0) <= size
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def newest_complete(output_dir: str | Path) -> tuple[CheckpointCheck | None, list[CheckpointCheck]]:
    """``(newest good checkpoint or None, checks of the newer ones that were skipped)``."""
    skipped = []
    for step, path in list_checkpoints(output_dir):
        check = verify_checkpoint(path, step)
        if check.ok:
            return check, skipped
        skipped.append(check)
    return None, skipped


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest complete checkpoint, or ``None``."""
    check, _skipped = newest_complete(output_dir)
    return check.path if check else None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """The completeness test of :func:`verify_checkpoint` for a ``checkpoint-N`` folder."""
    m = _CKPT.match(Path(path).name)
    return bool(m) and verify_checkpoint(Path(path), int(m.group(1))).ok


# ---- the marker (written by the worker) ---------------------------------------------------

def checkpoint_files(path: str | os.PathLike) -> dict[str, int]:
    """``{relative_path: size}`` of every file under a checkpoint, marker excluded."""
    root = Path(path)
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != CHECKPOINT_MARKER:
            files[p.relative_to(root).as_posix()] = p.stat().st_size
    return files


def write_checkpoint_marker(path: str | os.PathLike, step: int, files: dict[str, int] | None = None,
                            **extra) -> dict:
    """Write the marker that says "every rank finished writing this checkpoint", then fsync the folder.

    ``files``: the ``{relative path: size}`` every rank reported (format 2, see
    :mod:`orchestrator.worker.commit`); without it, this process's own listing of the folder (a
    checkpoint marked by hand).
    """
    listed = checkpoint_files(path) if files is None else dict(sorted(files.items()))
    record = {"step": int(step), "files": listed, **({"format": MARKER_FORMAT} if files is not None else {}),
              **extra}
    channel.write_json_atomic(Path(path) / CHECKPOINT_MARKER, record)
    fsync_dir(path)
    return record


def read_marker(path: str | os.PathLike) -> dict | None:
    """The completion marker of a checkpoint folder, or ``None``."""
    return read_json(Path(path) / CHECKPOINT_MARKER)


def checkpoint_step(path: str | os.PathLike | None) -> int:
    """Global step saved in a checkpoint's ``trainer_state.json`` (0 for none)."""
    if not path:
        return 0
    return int((read_json(Path(path) / TRAINER_STATE) or {}).get("global_step") or 0)


def tokens_at_checkpoint(path: str | os.PathLike | None) -> int:
    """Tokens seen over the whole job up to a checkpoint: its marker, else the last ``num_tokens`` logged."""
    if not path:
        return 0
    marker = read_marker(path) or {}
    if isinstance(marker.get("tokens"), (int, float)):
        return int(marker["tokens"])
    state = read_json(Path(path) / TRAINER_STATE) or {}
    for entry in reversed(state.get("log_history") or []):
        if isinstance(entry.get("num_tokens"), (int, float)):
            return int(entry["num_tokens"])
    return 0


# ---- rotation (save_total_limit), only once the new checkpoint is complete ---------------------

def rotate_checkpoints(output_dir: str | os.PathLike, limit: int | None, keep: tuple[str, ...] = (),
                       before_delete=None) -> list[Path]:
    """Delete what ``save_total_limit`` no longer keeps, never leaving fewer complete checkpoints than ``limit``.

    transformers deletes old checkpoints *before* the new one is known to be complete (its
    rotation runs inside the save, our marker comes after), so a kill in between could leave
    nothing to resume from; the worker turns that rotation off and calls this after writing the
    marker. Kept: the newest ``limit`` complete checkpoints and ``keep`` (the best model's
    folder). Deleted: older complete ones, and incomplete ones older than the newest complete.
    A complete checkpoint loses its marker first, so a deletion cut short leaves an incomplete
    folder, never a damaged "complete" one. Returns the deleted folders.
    """
    if not limit or limit < 1:
        return []
    complete, doomed = [], []
    for step, path in list_checkpoints(output_dir):
        ok = verify_checkpoint(path, step).ok
        if ok and len(complete) < limit:
            complete.append(path)
        elif complete and str(path) not in keep and str(path.absolute()) not in keep:
            doomed.append(path)   # older than a complete one that is kept
    deleted = []
    for path in doomed:
        if before_delete is not None:
            before_delete(path)
        (path / CHECKPOINT_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted

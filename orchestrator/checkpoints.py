"""Find the newest checkpoint that is *complete*, and say why others are not.

A checkpoint counts only if the worker's completion marker is there (written after
every rank finished writing, see ``channel.CHECKPOINT_MARKER``) and cheap checks
agree with it: ``trainer_state.json`` parses and its step matches the folder, every
file the marker lists exists with its recorded size and is non-empty, and every
safetensors file has a readable header. Reads only small files and headers.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .channel import CHECKPOINT_MARKER, read_json

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
    state = read_json(path / "trainer_state.json")
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

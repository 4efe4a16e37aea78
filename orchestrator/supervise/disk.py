"""A full disk, told as it is: where, how much is free, how much a checkpoint takes.

Incomplete checkpoint folders (a save cut short) are moved aside, into
``<output_dir>/.incomplete/``, so that the next attempt starts on a clean folder; nothing
complete is ever moved or deleted. Moving is a rename on the same filesystem: it needs
no space.
"""
from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Callable

from ..worker.checkpoints import list_checkpoints

ASIDE_DIR = ".incomplete"
MIN_FREE = 2**20   # below this nothing sensible can be written, whatever the checkpoint size


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free space (for this user) on the filesystem holding ``folder`` (or its nearest existing parent)."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def checkpoint_bytes(output_dir: str | os.PathLike) -> int | None:
    """What one checkpoint takes: the largest checkpoint folder (a save cut short is smaller; ``None``: none)."""
    sizes = [folder_bytes(path) for _, path in list_checkpoints(output_dir)[:3]]
    return max(sizes) if sizes else None


def disk_low(output_dir: str | os.PathLike) -> bool:
    """Less free space next to the checkpoints than one checkpoint takes (or than MIN_FREE)."""
    free = free_bytes(output_dir)
    if free is None:
        return False
    return free < max(checkpoint_bytes(output_dir) or 0, MIN_FREE)


def _mib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**20:,.1f} MiB"


def disk_full_message(output_dir: str | os.PathLike, where: str | None = None) -> str:
    """``disk full in <folder>: <free> free, one checkpoint takes <size>; ...``."""
    return (f"disk full in {where or output_dir}: {_mib(free_bytes(where or output_dir))} free, one checkpoint "
            f"takes {_mib(checkpoint_bytes(output_dir))}; every complete checkpoint is kept. Free space (or "
            f"lower save_total_limit), then: orchestrate resume")


def move_aside(output_dir: str | os.PathLike, paths: list[Path], *, fence: Callable[[], None]) -> list[Path]:
    """Move incomplete checkpoint folders into ``<output_dir>/.incomplete/``; return where they went.

    ``fence`` (the lease's check) runs before each move: a supervisor that lost the job moves nothing
    (the folder may be the save its successor's attempt is writing right now).
    """
    moved = []
    aside = Path(output_dir) / ASIDE_DIR
    for path in paths:
        fence()
        target = aside / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while target.exists():
            target, n = aside / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.{n}", n + 1
        try:
            aside.mkdir(exist_ok=True)
            os.rename(path, target)
            moved.append(target)
        except OSError:
            continue
    return moved


def is_disk_full(exc: BaseException) -> bool:
    """An error of the supervisor's own writes that means "no space left" (files or the SQLite ledger)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc).lower()

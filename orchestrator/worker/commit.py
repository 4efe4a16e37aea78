"""A checkpoint is complete only when every rank says so (issue 17.6); this runs off the step path.

:meth:`Committer.run` is one save's background job, on every rank, in this order:

1. the ranks agree that each is ready to write (a failure before the write stops all of them
   before DCP's collectives, instead of leaving the others waiting in them);
2. the staged shards are persisted (DCP, over the background gloo group), if the save has any;
3. each rank fsyncs the files it wrote and reports ``{relative path: size}`` (:func:`own_files`:
   its own DCP shards and RNG state; rank 0 everything else), and the reports are gathered;
4. rank 0 checks the gathered list (:func:`incomplete`: ``trainer_state.json``, each rank's RNG
   state, and every file DCP's ``.metadata`` names, at least as large as the data it points into)
   and every rank learns the verdict;
5. rank 0, unless fenced (:mod:`.fence`), writes the marker from that list and fsyncs the folder,
   records the checkpoint, and rotates (checking the fence before every deletion).

Nothing here waits on training, and training waits on this only when the next save begins
(at most one save in flight) or training ends.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .async_save import persist
from .channel import CHECKPOINT_MARKER, fsync_dir
from .checkpoints import DCP_METADATA, TRAINER_STATE, write_checkpoint_marker
from .fence import Fence, Fenced

_PER_RANK = re.compile(r"^(?:rng_state_(\d+)\.pth|__(\d+)_\d+\.distcp)$")   # transformers' RNG state, DCP's shards


@dataclass
class Save:
    """One checkpoint save: where, which step, when it began, how long training was blocked."""

    path: str
    step: int
    started: float
    blocked_s: float = 0.0
    staged: list = field(default_factory=list)   # (folder, state dict) pairs persisted in the background
    marker: dict = field(default_factory=dict)   # what the marker says besides the files
    why: dict = field(default_factory=dict)      # reason (and request time) for the records
    async_write: bool = False
    write_s: float | None = None
    expect_rng: bool = True                      # every rank wrote an RNG state file


@dataclass
class Outcome:
    """What every rank learns of a save; ``committed`` (rank 0): the marker was written."""

    ok: bool
    error: str | None = None
    files: dict[str, int] = field(default_factory=dict)
    committed: bool = False


def own_files(path: str | os.PathLike, rank: int) -> dict[str, int]:
    """``{relative path: size}`` of the files of a checkpoint folder this rank wrote, fsynced (with their folders)."""
    root = Path(path)
    mine, folders = {}, set()
    for p in sorted(root.rglob("*")):
        name = p.name
        if not p.is_file() or name == CHECKPOINT_MARKER or (name.startswith(".") and name != DCP_METADATA):
            continue   # the marker, and temporary files of atomic writes
        m = _PER_RANK.match(name)
        owner = int(m.group(1) or m.group(2)) if m else 0
        if owner != rank:
            continue
        _fsync_file(p)
        mine[p.relative_to(root).as_posix()] = p.stat().st_size
        folders.add(p.parent)
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        fsync_dir(folder)
    return mine


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def incomplete(path: str | os.PathLike, files: dict[str, int], world_size: int, expect_rng: bool) -> str | None:
    """What the gathered list lacks for a complete checkpoint (``None``: nothing)."""
    if TRAINER_STATE not in files:
        return f"{TRAINER_STATE} was not reported"
    if expect_rng:
        names = ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{r}.pth" for r in range(world_size)]
        missing = [n for n in names if n not in files]
        if missing:
            return f"{', '.join(missing)} not reported (by the rank that writes it)"
    folders = {rel.rsplit("/", 1)[0] for rel in files if "/" in rel and
               (rel.endswith(".distcp") or rel.endswith("/" + DCP_METADATA))}
    for folder in sorted(folders):
        if f"{folder}/{DCP_METADATA}" not in files:
            return f"{folder}/{DCP_METADATA} was not reported (DCP's save did not finish)"
        problem = _against_dcp_metadata(Path(path) / folder, folder, files)
        if problem:
            return problem
    return None


def _against_dcp_metadata(directory: Path, folder: str, files: dict[str, int]) -> str | None:
    """Every file DCP's ``.metadata`` points into was reported, with the bytes it points at."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - unreadable metadata is an incomplete checkpoint
        return f"{folder}/{DCP_METADATA} unreadable ({type(exc).__name__}: {exc})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = f"{folder}/{info.relative_path}"
        needed[rel] = max(needed.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(needed.items()):
        if rel not in files:
            return f"{rel} (named in {folder}/{DCP_METADATA}) was not reported by any rank"
        if files[rel] < size:
            return f"{rel} has {files[rel]} bytes, {folder}/{DCP_METADATA} points up to byte {size}"
    return None


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Committer:
    """One save's background job (see the module doc). ``collectives`` is the writer group's
    ``all_ok(flag)``, ``gather(obj) -> list`` and ``broadcast(obj) -> obj`` from rank 0 (single-process forms
    without a group). ``on_commit``/``on_failure`` record the outcome (rank 0), ``rotate(save)`` purges;
    ``point(name, step)`` fires the test-only save faults."""

    def __init__(self, rank: int, world_size: int, group, collectives, fence: Fence,
                 point: Callable[[str, int], None], on_commit: Callable[[Save, Outcome], None],
                 on_failure: Callable[[Save, Outcome], None], rotate: Callable[[Save], None]):
        self.rank, self.world_size, self.group, self.coll, self.fence = rank, world_size, group, collectives, fence
        self.point, self.on_commit, self.on_failure, self.rotate = point, on_commit, on_failure, rotate

    def run(self, save: Save) -> Outcome:
        """Persist, report, gather, check, mark, record and rotate ``save`` (every rank; see the module doc)."""
        t0, error = time.time(), None
        try:
            self.point("write", save.step)
        except Exception as exc:  # noqa: BLE001 - a failed write is a failed save, never a crash of training
            error = describe(exc)
        if not self.coll.all_ok(error is None):
            error = error or "another rank failed before writing"
        else:
            try:
                persist(save.staged, self.group)
            except Exception as exc:  # noqa: BLE001
                error = describe(exc)
        if save.async_write:
            save.write_s = round(time.time() - t0, 3)
        save.staged = []   # free the staged copies
        files: dict[str, int] = {}
        if error is None:
            try:
                files = own_files(save.path, self.rank)
            except OSError as exc:
                error = describe(exc)
        reports = self.coll.gather({"rank": self.rank, "error": error, "files": files})
        outcome = self._verdict(save, reports)
        self.point("marker", save.step)
        if self.rank == 0:
            self._commit(save, outcome)
        return outcome

    def _verdict(self, save: Save, reports: list[dict]) -> Outcome:
        errors = [f"rank {r['rank']}: {r['error']}" for r in reports if r.get("error")]
        merged: dict[str, int] = {}
        for r in reports:
            merged.update(r.get("files") or {})
        verdict = "; ".join(errors) or None
        if verdict is None and self.rank == 0:
            verdict = incomplete(save.path, merged, self.world_size, save.expect_rng)
        verdict = self.coll.broadcast(verdict)   # rank 0's word, so that every rank agrees (best model, records)
        return Outcome(ok=verdict is None, error=verdict, files=merged)

    def _commit(self, save: Save, outcome: Outcome) -> None:
        """Rank 0: marker, record and rotation of a good save; the record of a failed one."""
        if not outcome.ok:
            self.on_failure(save, outcome)
            return
        try:
            self.fence.check(f"the marker of {Path(save.path).name}")
        except Fenced:
            return
        try:
            write_checkpoint_marker(save.path, save.step, files=outcome.files, **save.marker)
            fsync_dir(Path(save.path).parent)    # the checkpoint folder's own entry
        except OSError as exc:
            outcome.ok, outcome.error = False, f"rank 0: {describe(exc)} (writing the marker)"
            self.on_failure(save, outcome)
            return
        outcome.committed = True
        self.on_commit(save, outcome)
        try:
            self.rotate(save)
        except Fenced:
            pass   # said on stderr; nothing more is deleted

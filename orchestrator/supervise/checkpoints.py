"""Which checkpoint the next attempt resumes from, and what a full disk leaves behind.

Only complete checkpoints count (:mod:`orchestrator.worker.checkpoints`); a save cut short is
moved aside so that the next attempt writes into a clean folder; nothing complete is ever moved.
"""
from __future__ import annotations

from typing import Callable

from ..worker.checkpoints import list_checkpoints, newest_complete
from ..worker.stages import extra_folders
from . import disk


def verified_step(output_dir: str) -> int | None:
    """The step of the newest complete checkpoint, if any."""
    good, _ = newest_complete(output_dir)
    return good.step if good else None


def progress_mark(plan) -> tuple[int, ...]:
    """The newest complete step of the job's folder, then of each later training stage of a script
    (:mod:`orchestrator.worker.stages`); a greater tuple means an attempt saved a new checkpoint."""
    folders = extra_folders(plan.run_dir, plan.output_dir) if plan.script else []
    return tuple(verified_step(str(f)) or 0 for f in [plan.output_dir, *folders])


def _clean_stage_folders(plan, event: Callable[[str], None], fence: Callable[[], None]) -> None:
    """A script's later stages resume from their own newest complete checkpoint (the worker picks it):
    move their newer, incomplete ones aside, as for the job's folder, so that a save writes a clean folder."""
    for folder in extra_folders(plan.run_dir, plan.output_dir) if plan.script else []:
        good, skipped = newest_complete(folder)
        for check, where in zip(skipped, disk.move_aside(folder, [c.path for c in skipped], fence=fence)):
            event(f"skipping {folder.name}/{check.path.name}: {check.reason}; moved to {where}")


def resume_point(plan, attempts, event: Callable[[str], None], fence: Callable[[], None]
                 ) -> tuple[str | None, str | None]:
    """``(checkpoint to resume from or None, reason to stop instead)`` for the next attempt.

    ``fence``: the lease's check, run before anything is moved aside."""
    _clean_stage_folders(plan, event, fence)
    good, skipped = newest_complete(plan.output_dir)
    # Every attempt so far started from scratch: the checkpoints are their saves cut short, so
    # starting from scratch again loses no verified work (it is not the silent restart refused below).
    own_only = bool(attempts) and all(a.resumed_from is None for a in attempts)
    scratch_ok = plan.retry.restart_from_scratch or own_only
    if good or (skipped and scratch_ok):
        moved = disk.move_aside(plan.output_dir, [c.path for c in skipped], fence=fence)
        for check, where in zip(skipped, moved):
            event(f"skipping {check.path.name}: {check.reason}; moved to {where}")
    else:
        for check in skipped:
            event(f"skipping {check.path.name}: {check.reason}")
    if good:
        return str(good.path), None
    given = plan.worker_config.get("resume_from_checkpoint")
    if isinstance(given, str) and given.lower() not in ("", "true", "false", "none"):
        return given, None  # the user's own starting point (e.g. a checkpoint of a manual run)
    if list_checkpoints(plan.output_dir) and not scratch_ok:
        return None, (f"checkpoints exist in {plan.output_dir} but none is complete; not starting "
                      "over silently (set launch.retry.restart_from_scratch: true to allow it)")
    return None, None


def disk_full_detail(output_dir: str, detail: str, fence: Callable[[], None]) -> str:
    """What a DISK_FULL attempt's record says: where, how full, what was moved aside (and the error)."""
    incomplete = [c.path for c in newest_complete(output_dir)[1]]
    moved = disk.move_aside(output_dir, incomplete, fence=fence)
    aside = f"; incomplete {', '.join(p.name for p in incomplete)} moved to {moved[0].parent}" if moved else ""
    text = disk.disk_full_message(output_dir) + aside
    return f"{text} ({detail})" if detail else text

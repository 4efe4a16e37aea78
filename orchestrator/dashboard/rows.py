"""What a row of the jobs table says about a job (issue 19), beyond its numbers: why it ended (key words
first), its name with the keys it was submitted with, and what each attempt really gained. Pure."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..states import JobState

if TYPE_CHECKING:
    from .render import Snapshot


def end_reason(s: Snapshot) -> str:
    """Why a job ended, key words first (issue 19): ``OOM: <the error> · <advice>``; else its last event."""
    j = s.job
    msg = (j.message or "").splitlines()[0] if j.message else ""
    if j.state is not JobState.FAILED:
        return msg
    last = next((a for a in reversed(j.attempts) if a.failure), None)
    if last is None or last.failure == "COMPLETED":
        return msg.replace("training completed, but ", "final model check: ", 1)
    detail = (last.message or "").splitlines()[0] if last.message else ""
    msg = msg[len(last.failure) + 2:] if msg.startswith(f"{last.failure}: ") else msg
    return f"{last.failure}: " + " · ".join(part for part in (detail, msg) if part)


def shown_name(s: Snapshot) -> str:
    """The job's name, with the KEY=VALUE it was submitted with (a sweep's point is in its name already)."""
    extra = [o for o in s.overrides if not o.startswith("output_dir=")] if not s.job.group_id else []
    return " ".join([s.job.name, *extra])


def steps_kept(s: Snapshot, k: int) -> tuple[int | None, int]:
    """``(steps the k-th attempt gained for good, steps it trained but lost)``: what the next attempt resumed
    from (or, for the last, its newest verified checkpoint) counts; steps after that were trained again."""
    a, later = s.job.attempts[k], s.job.attempts[k + 1:]
    if a.start_step is None or a.end_step is None:
        return None, 0
    if a.failure == "COMPLETED":
        kept_at = a.end_step
    elif later and later[0].start_step is not None:
        kept_at = later[0].start_step
    else:
        ckpt = s.progress.last_checkpoint_step
        kept_at = ckpt if isinstance(ckpt, int) and a.start_step <= ckpt <= a.end_step else a.start_step
    kept_at = min(max(kept_at, a.start_step), a.end_step)
    return kept_at - a.start_step, a.end_step - kept_at


def steps_gained_text(s: Snapshot, k: int) -> str:
    """``200 (73 lost)``: the attempts table's "steps gained" (issue 19: lost steps are not gains)."""
    kept, lost = steps_kept(s, k)
    return "-" if kept is None else f"{kept}" + (f" ({lost} lost)" if lost else "")

"""Sweep groups on screen (issue 19): the group table of ``status --group G`` and its ``--json``, and the
jobs of a group kept together as one block in the all-jobs view. Pure: snapshots in, rows out.
"""
from __future__ import annotations

import math
import time
from typing import Any

from rich.console import Group as Stack
from rich.text import Text

from ..states import JobState
from ..store.groups import Group
from .render import STATE_STYLE, Snapshot, fmt_duration
from .table import Col, FastTable


def _eval_loss(entry: dict | None) -> float | None:
    loss = ((entry or {}).get("metrics") or {}).get("eval_loss")
    return float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None


def group_rows(group: Group, snaps: dict[str, Snapshot]) -> list[dict[str, Any]]:
    """One row per point: its keys, state, step, loss, last and best eval loss; best eval loss first
    (points without an evaluation last, in grid order)."""
    rows = []
    for index, point in enumerate(group.points):
        s = snaps.get(point.job_id)
        p = s.progress if s else None
        best = p.best_eval if p else None
        rows.append({
            "index": index + 1, "job": point.job_id, "suffix": point.suffix, "keys": dict(point.keys),
            "state": s.job.state.value if s else None, "step": p.step if p else None,
            "max_steps": (p.max_steps or s.job.max_steps or s.planned_steps) if s else None,
            "loss": p.loss if p and isinstance(p.loss, (int, float)) and math.isfinite(p.loss) else None,
            "last_eval_loss": _eval_loss(p.last_eval if p else None), "best_eval_loss": _eval_loss(best),
            "best_eval_step": (best or {}).get("step"), "output_dir": s.job.output_dir if s else None,
            "message": (s.job.message or "").splitlines()[0] if s and s.job.message else None,
        })
    return sorted(rows, key=lambda r: (r["best_eval_loss"] is None, r["best_eval_loss"] or 0.0, r["index"]))


def group_json(group: Group, snaps: dict[str, Snapshot]) -> dict[str, Any]:
    """``status --group G --json``: the group and its table."""
    rows = group_rows(group, snaps)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"] or "MISSING"] = counts.get(r["state"] or "MISSING", 0) + 1
    return {"group": group.id, "name": group.name, "keys": list(group.keys), "overrides": list(group.overrides),
            "backend": group.backend, "max_parallel": group.max_parallel, "parallel_why": group.parallel_why,
            "config_path": group.config_path, "created": group.created, "counts": counts, "jobs": rows}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _key(v: Any) -> str:
    """A swept value as people write it (0.001, not 0.0010)."""
    return f"{v:g}" if isinstance(v, float) else str(v)


def group_frame(group: Group, snaps: dict[str, Snapshot], now: float, hint: str | None = None) -> Stack:
    """``status --group G``: a head line, then one row per point, best eval loss first."""
    data = group_json(group, snaps)
    head = Text.assemble(("group ", "bold"), (group.id, "bold"), f"  {len(group.points)} job(s) over "
                         f"{' x '.join(group.keys)}", ("" if group.backend != "local" else
                                                        f"; {group.max_parallel} at once ({group.parallel_why})"))
    for state in JobState:
        if data["counts"].get(state.value):
            head.append(f"  {data['counts'][state.value]} ")
            head.append(state.value, style=STATE_STYLE[state])
    head.append(time.strftime("   %H:%M:%S", time.localtime(now)), style="dim")
    cols = [Col("#", 0, right=True), Col("job", 0), *[Col(k, 0) for k in group.keys], Col("state", 0),
            Col("step", 0, right=True), Col("loss", 3, right=True), Col("last eval", 0, right=True),
            Col("best eval", 0, right=True), Col("last event", 5, flex=True)]
    rows = []
    for r in data["jobs"]:
        state = JobState(r["state"]) if r["state"] else None
        best = _fmt(r["best_eval_loss"]) + (f" @{r['best_eval_step']}" if r["best_eval_step"] is not None else "")
        rows.append([((str(r["index"]), ""),), ((r["job"], "bold"),), *[((_key(r["keys"].get(k)), ""),)
                                                                      for k in group.keys],
                     ((r["state"] or "missing", STATE_STYLE.get(state, "red")),),
                     ((f"{_fmt(r['step'])}/{r['max_steps'] or '?'}", ""),), ((_fmt(r["loss"]), ""),),
                     ((_fmt(r["last_eval_loss"]), ""),), ((best, "green" if r["best_eval_loss"] is not None else ""),),
                     ((r["message"] or "", "dim"),)])
    parts: list = [head, FastTable(cols, rows, footer=None if rows else "no jobs in this group")]
    if hint:
        parts.append(Text(hint, style="dim"))
    return Stack(*parts)


def in_blocks(snaps: list[Snapshot]) -> list[Snapshot]:
    """The jobs of a group together, where the group's first job stands, in the order they were submitted."""
    members: dict[str, list[Snapshot]] = {}
    for s in snaps:
        if s.job.group_id:
            members.setdefault(s.job.group_id, []).append(s)
    out, placed = [], set()
    for s in snaps:
        gid = s.job.group_id
        if not gid:
            out.append(s)
        elif gid not in placed:
            placed.add(gid)
            out.extend(sorted(members[gid], key=lambda m: (m.job.created, m.job.id)))
    return out


def block_header(group_id: str, block: list[Snapshot], now: float) -> str:
    """The line above a group's block: its id, how many jobs are in which state, how long it has run."""
    counts: dict[str, int] = {}
    for s in block:
        counts[s.job.state.value] = counts.get(s.job.state.value, 0) + 1
    start = min(s.job.created for s in block)
    states = ", ".join(f"{n} {state}" for state, n in counts.items())
    return f"group {group_id}: {len(block)} job(s), {states}, {fmt_duration(now - start)}; " \
           f"orchestrate status --group {group_id}"

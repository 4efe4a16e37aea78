"""Pure rendering: a snapshot of ledger + progress in, a rich renderable out.

No I/O happens here; the CLI reads the files and passes snapshots in, so the
same functions serve ``status --once``, the live view and the tests.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .follow import ProgressState
from .ledger import Job
from .states import JobState

STATE_STYLE = {
    JobState.PENDING: "yellow", JobState.RUNNING: "bold cyan", JobState.RESUMING: "bold yellow",
    JobState.COMPLETED: "bold green", JobState.FAILED: "bold red", JobState.CANCELLED: "magenta",
}
_SPARK = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class Snapshot:
    job: Job
    progress: ProgressState
    now: float


def sparkline(values: list[float], width: int = 24) -> str:
    """One character per value; a non-finite value (a diverged loss: NaN/inf) shows as '!'."""
    if not values:
        return ""
    values = values[-width:]
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    span = (hi - lo) or 1.0
    return "".join(_SPARK[min(len(_SPARK) - 1, int((v - lo) / span * (len(_SPARK) - 1)))]
                   if math.isfinite(v) else "!" for v in values)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def jobs_table(snaps: list[Snapshot]) -> Table:
    """One row per job."""
    t = Table(expand=False, header_style="bold")
    for col in ("job", "backend", "state", "attempt", "progress", "step", "loss", "", "tok/s", "ETA",
                "checkpoint", "elapsed"):
        t.add_column(col, no_wrap=True)
    for s in snaps:
        j, p = s.job, s.progress
        total = p.max_steps or j.max_steps
        bar = ProgressBar(total=total or 1, completed=min(p.step, total or 0), width=16)
        eta = p.eta_s() if j.state is JobState.RUNNING else None
        end = j.updated if j.state.is_terminal else s.now
        t.add_row(
            j.id, j.backend, Text(j.state.value, style=STATE_STYLE[j.state]), str(len(j.attempts) or "-"),
            bar, f"{p.step}/{total or '?'}", _num(p.loss, ".4f"), sparkline([l for _, l in p.losses]),
            _num(p.tokens_per_s, ",.0f"), fmt_duration(eta), f"step {p.last_checkpoint_step}"
            if p.last_checkpoint_step is not None else "-", fmt_duration(end - j.created),
        )
    return t


def job_detail(s: Snapshot) -> Group:
    """One job: summary, attempts and where its files are."""
    j, p = s.job, s.progress
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("job", f"{j.id} ({j.name}, {j.backend})")
    head.add_row("state", Text(j.state.value, style=STATE_STYLE[j.state]))
    mode = p.distributed_type or j.distributed_type or "-"
    if p.fsdp_version:
        mode += f" (FSDP{p.fsdp_version})"
    head.add_row("distributed", f"{mode}, world size {p.world_size or '-'}")
    head.add_row("step", f"{p.step}/{p.max_steps or j.max_steps or '?'}   loss {_num(p.loss, '.4f')}  "
                         f"{sparkline([l for _, l in p.losses], 40)}")
    head.add_row("throughput", f"{_num(p.tokens_per_s, ',.0f')} tokens/s, ETA {fmt_duration(p.eta_s())}")
    head.add_row("checkpoint", p.last_checkpoint or "-")
    head.add_row("run dir", j.run_dir)
    if j.message:
        head.add_row("last event", j.message)
    att = Table(title="attempts", title_justify="left", header_style="bold")
    for col in ("#", "started", "duration", "exit", "failure", "resumed from", "steps gained", "detail"):
        att.add_column(col)
    for a in j.attempts:
        dur = (a.ended or s.now) - a.started
        att.add_row(str(a.n), time.strftime("%H:%M:%S", time.localtime(a.started)), fmt_duration(dur),
                    "-" if a.exit_code is None else str(a.exit_code), a.failure or "running",
                    (a.resumed_from or "-").rsplit("/", 1)[-1], _num(a.steps_gained, "d"), a.message or "")
    return Group(head, att)

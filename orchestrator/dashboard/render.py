"""Pure rendering: a snapshot of ledger + progress in, a rich renderable (or JSON data) out.

No I/O happens here; ``live.py`` reads the files and passes snapshots in, so the same
functions serve ``status --once``, the live views, ``--json`` and the tests. The jobs
table is a light renderer of its own (``table.py``): rich's ``Table`` measures every cell
and takes seconds for a thousand rows.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..states import JobState
from ..store.lease import SupervisorHealth, unsupervised
from ..store.ledger import Job
from ..store.logs import FirstError
from ..store.progress import ProgressState
from .charts import bar, loss_chart, sparkline
from .goodput_view import detail_rows, eval_cell, eval_json, goodput_cell, loss_curve, only_shown_columns
from .rows import end_reason, shown_name, steps_gained_text, steps_kept
from .table import Banner, Col, FastTable

__all__ = ["Snapshot", "STATE_STYLE", "sparkline", "fmt_duration", "jobs_table", "list_table", "job_detail",
           "status_frame", "detail_frame", "snapshot_json", "attempt_label", "attempt_budget", "order_for_status"]

STATE_STYLE = {
    JobState.QUEUED: "blue", JobState.PENDING: "yellow", JobState.RUNNING: "bold cyan",
    JobState.RESUMING: "bold yellow",
    JobState.COMPLETED: "bold green", JobState.FAILED: "bold red", JobState.CANCELLED: "magenta",
}
_BAR_STYLE = {JobState.COMPLETED: "green", JobState.FAILED: "red", JobState.CANCELLED: "magenta",
              JobState.RESUMING: "yellow", JobState.PENDING: "yellow", JobState.RUNNING: "cyan",
              JobState.QUEUED: "blue"}
_NOT_CHARGED = ("PREEMPTED",)   # graceful stops have a budget of their own (supervise/policy.py)


@dataclass(frozen=True)
class Snapshot:
    """Everything one frame shows about one job, read from disk beforehand."""

    job: Job
    progress: ProgressState
    now: float
    max_restarts: int | None = None                               # plan.json retry.max_restarts
    planned_steps: int | None = None                              # plan.json worker_config.max_steps
    errors: Mapping[int, FirstError] = field(default_factory=dict)  # attempt n -> its first error
    log_dir: str | None = None                                    # rank logs of the latest attempt
    supervisor: SupervisorHealth | None = None                    # from the lease (read for unfinished jobs)
    heartbeat: Mapping[str, Any] | None = None                    # the latest attempt's heartbeat.json (phase)
    overrides: tuple[str, ...] = ()                               # plan.json: KEY=VALUE of the command line
    goodput: Mapping[str, Any] | None = None                      # store/goodput.py Account.to_json()


def supervisor_gone(s: Snapshot) -> bool:
    """An unfinished job whose supervisor is gone (dead, stopped, never started): it needs ``resume``."""
    return s.supervisor is not None and unsupervised(s.job, s.supervisor, s.now)


def phase_text(s: Snapshot) -> str | None:
    """``saving for 0:42 (step 20)``: what the running attempt's rank 0 is doing, from its heartbeat."""
    hb = s.heartbeat
    if not hb or s.job.state.is_terminal or not hb.get("phase"):
        return None
    since = hb.get("since")
    took = f" for {fmt_duration(s.now - since)}" if isinstance(since, (int, float)) else ""
    if hb["phase"] == "script":   # orchestrator/worker/script_runner.py: no Trainer created (yet)
        return f"running the script{took}: it has created no Trainer yet, so no progress is reported"
    return f"{hb['phase']}{took}" + (f" (step {hb['step']})" if hb.get("step") else "")


def supervisor_line(s: Snapshot) -> Text:
    """The job detail's supervisor row: who holds the job, or that nobody does and what to run."""
    sup = s.supervisor
    if supervisor_gone(s):
        who = f"pid {sup.pid} on {sup.host}, last heartbeat {fmt_duration(sup.heartbeat_age_s)} ago" if sup.pid \
            else "none ever started"
        return Text.assemble(("GONE", "bold red"), f" ({who}): the job is not supervised; run ",
                             (f"orchestrate resume {s.job.id}", "bold"))
    if s.job.backend == "slurm" and not s.job.state.is_terminal and (sup is None or not sup.alive):
        return Text(f"inside its SLURM allocation, when it runs (SLURM job {s.job.scheduler_job_id or '?'})")
    if sup is None or s.job.state.is_terminal or not sup.alive:
        return Text("-")
    return Text(f"pid {sup.pid} on {sup.host}, heartbeat {sup.heartbeat_age_s:.0f} s ago")


def fmt_duration(seconds: float | None) -> str:
    """``m:ss`` or ``h:mm:ss``; ``-`` for unknown."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def attempt_budget(s: Snapshot) -> int | None:
    """Attempts the job may make: max_restarts + 1, plus its graceful stops (not charged to it)."""
    if s.max_restarts is None:
        return None
    return s.max_restarts + 1 + sum(1 for a in s.job.attempts if a.failure in _NOT_CHARGED)


def attempt_label(s: Snapshot) -> str:
    """``n/budget`` (see :func:`attempt_budget`), or ``n`` when the plan is unknown."""
    n, budget = len(s.job.attempts), attempt_budget(s)
    return str(n or "-") if budget is None else f"{n}/{budget}"


def _total(s: Snapshot) -> int | None:
    return s.progress.max_steps or s.job.max_steps or s.planned_steps


def _step(s: Snapshot) -> int:
    return s.progress.step


def _elapsed(s: Snapshot) -> float:
    end = s.job.updated if s.job.state.is_terminal else s.now
    # a sweep's job counts from its first attempt: the time it waited QUEUED for its turn is not its own
    start = s.job.attempts[0].started if s.job.group_id and s.job.attempts else s.job.created
    return max(0.0, end - start)


def _eta(s: Snapshot) -> float | None:
    return s.progress.eta_s() if s.job.state is JobState.RUNNING else None


def order_for_status(snaps: list[Snapshot]) -> list[Snapshot]:
    """Jobs still going first, then finished ones; newest first within each (stable)."""
    return sorted(snaps, key=lambda s: (s.job.state.is_terminal, -s.job.created))


_JOB_COLS = [Col("job", 0), Col("name", 9), Col("backend", 8), Col("state", 0), Col("att", 3, right=True),
             Col("progress", 5), Col("step", 0, right=True), Col("loss", 2, right=True), Col("trend", 7),
             Col("eval", 6, right=True), Col("goodput", 5, right=True), Col("tok/s", 4, right=True),
             Col("ETA", 3, right=True), Col("checkpoint", 6),
             Col("elapsed", 4, right=True), Col("last event", 10, flex=True)]


def _starting(s: Snapshot) -> str | None:
    """While an attempt starts (no training step of it yet): what it is doing, from rank 0's heartbeat."""
    if s.job.state.value != "RUNNING":
        return None
    phase = (s.heartbeat or {}).get("phase")
    if phase in ("setup", "loading"):
        return f"starting up ({phase})"
    if phase is None and not s.progress.step:
        return "starting up (launching the ranks)"
    return None


def _last_event(s: Snapshot):
    if supervisor_gone(s):
        return ((f"! supervisor gone: orchestrate resume {s.job.id}", "bold red"),)
    starting = _starting(s)
    if starting:
        return ((starting, "yellow"),)
    ended = s.job.state in (JobState.FAILED, JobState.CANCELLED)
    return ((end_reason(s), _BAR_STYLE[s.job.state] if ended else "dim"),)


def jobs_table(snaps: list[Snapshot], max_rows: int | None = None) -> FastTable:
    """One row per job; columns that do not fit the width are dropped, least useful first. A FAILED or
    CANCELLED row is in its state's colour; the jobs of a sweep stand together under their group's line."""
    from .groups import block_header

    rows: list = []
    shown = snaps if max_rows is None else snaps[:max(0, max_rows)]
    names = [shown_name(s) for s in shown]
    twins = Counter(names)   # two jobs of one config: told apart by when they were submitted
    for k, s in enumerate(shown):
        j, p = s.job, s.progress
        if j.group_id and (k == 0 or shown[k - 1].job.group_id != j.group_id):
            rows.append(Banner(block_header(j.group_id, [t for t in shown if t.job.group_id == j.group_id], s.now)))
        total = _total(s)
        done, rest = bar(min(_step(s), total) / total if total else 0.0, 12)
        ckpt = f"step {p.last_checkpoint_step}" if p.last_checkpoint_step is not None else "-"
        ended = j.state in (JobState.FAILED, JobState.CANCELLED)
        row_style = _BAR_STYLE[j.state] if ended else ""
        name = names[k] + (time.strftime(" @%H:%M", time.localtime(j.created)) if twins[names[k]] > 1 else "")
        rows.append([
            (((" " if j.group_id else "") + j.id, f"bold {row_style}".strip()),), ((name, row_style),),
            ((j.backend, ""),), ((j.state.value, STATE_STYLE[j.state]),),
            ((attempt_label(s), ""),), ((done, _BAR_STYLE[j.state]), (rest, "bright_black")),
            ((f"{_step(s)}/{total or '?'}", row_style),), ((_num(p.loss, ".4f"), ""),),
            ((sparkline([v for _, v in p.losses], 16), "bright_black" if ended else "cyan"),),
            ((eval_cell(p), "magenta"),), ((goodput_cell(s.goodput), ""),), ((_num(p.tokens_per_s, ",.0f"), ""),),
            ((fmt_duration(_eta(s)), ""),), ((ckpt, "green" if ckpt != "-" else ""),),
            ((fmt_duration(_elapsed(s)), ""),), _last_event(s),
        ])
    more = len(snaps) - len(shown)
    footer = f"… {more} more job(s) not shown: orchestrate list" if more else \
        None if snaps else "no jobs yet: orchestrate submit CONFIG"
    return FastTable(*only_shown_columns(_JOB_COLS, rows, shown), footer=footer)


_LIST_COLS = [Col("job", 0), Col("name", 6), Col("backend", 5), Col("state", 0), Col("attempts", 3, right=True),
              Col("step", 0, right=True), Col("created", 4), Col("elapsed", 2, right=True),
              Col("last event", 7, flex=True)]


def list_table(jobs: list[Job], now: float) -> FastTable:
    """``orchestrate list``: ledger columns only (no progress files), fast for any number of jobs."""
    rows = []
    for j in jobs:
        end = j.updated if j.state.is_terminal else now
        rows.append([((j.id, "bold"),), ((j.name, ""),), ((j.backend, ""),), ((j.state.value, STATE_STYLE[j.state]),),
                     ((str(len(j.attempts)), ""),), ((f"{j.step}/{j.max_steps or '?'}", ""),),
                     ((time.strftime("%m-%d %H:%M", time.localtime(j.created)), ""),),
                     ((fmt_duration(max(0.0, end - j.created)), ""),),
                     (((j.message or "").splitlines()[0] if j.message else "", "dim"),)])
    return FastTable(_LIST_COLS, rows, footer=None if rows else "no jobs")


def where_ran(a) -> str:
    """``SLURM 33.1 on n1,n2, in place``: where an attempt ran (scheduler jobs only)."""
    if not a.scheduler_job_id:
        return "-"
    how = {1: ", in place", 0: ", via the queue"}.get(a.in_place, "")
    return f"SLURM {a.external_id or a.scheduler_job_id}" + (f" on {a.nodes}" if a.nodes else "") + how


def _attempts_table(s: Snapshot) -> Table:
    att = Table(title="attempts", title_justify="left", header_style="bold", title_style="bold")
    slurm = any(a.scheduler_job_id for a in s.job.attempts)
    cols = ("#", "started", "duration", "exit", "failure", "resumed from", "steps gained", "world", *(
        ("where",) if slurm else ()), "detail")
    for col in cols:
        att.add_column(col, overflow="fold" if col in ("detail", "where") else "ellipsis")
    for k, a in enumerate(s.job.attempts):
        dur = (a.ended or s.now) - a.started
        err = s.errors.get(a.n)
        detail = (a.message or "").splitlines()[0] if a.message else (err.line() if err else "")
        failure = Text(a.failure or "running", style="green" if a.failure == "COMPLETED" else
                       "cyan" if not a.failure else "yellow" if a.failure == "PREEMPTED" else "red")
        att.add_row(str(a.n), time.strftime("%H:%M:%S", time.localtime(a.started)), fmt_duration(dur),
                    "-" if a.exit_code is None else str(a.exit_code), failure,
                    (a.resumed_from or "-").rsplit("/", 1)[-1], steps_gained_text(s, k),
                    "-" if a.world_size is None else str(a.world_size), *((where_ran(a),) if slurm else ()), detail)
    return att


def job_detail(s: Snapshot, chart_width: int = 60, chart_height: int = 8) -> Group:
    """One job: summary, loss curve, attempts, first errors and where the logs are.

    The loss curve is left out when ``chart_height`` < 3 (a short terminal).
    """
    j, p = s.job, s.progress
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("job", f"{j.id} ({j.name}, {j.backend})")
    head.add_row("state", Text.assemble((j.state.value, STATE_STYLE[j.state]), f"   attempt {attempt_label(s)}"))
    total = _total(s)
    done, rest = bar(min(_step(s), total) / total if total else 0.0, 24)
    pct = f" ({100 * _step(s) // total}%)" if total else ""
    head.add_row("step", Text.assemble((done, _BAR_STYLE[j.state]), (rest, "bright_black"),
                                       f" {_step(s)}/{total or '?'}{pct}   loss {_num(p.loss, '.4f')}  ",
                                       (sparkline([v for _, v in p.losses], 24), "cyan")))
    head.add_row("throughput", f"{_num(p.tokens_per_s, ',.0f')} tokens/s   ETA {fmt_duration(_eta(s))}   "
                               f"elapsed {fmt_duration(_elapsed(s))}")
    for name, row in detail_rows(p, s.goodput):   # eval loss, goodput, step time (issues 16.2, 20)
        head.add_row(name, row)
    mode = p.distributed_type or j.distributed_type or "-"
    if p.fsdp_version:
        mode += f" (FSDP{p.fsdp_version})"
    head.add_row("distributed", f"{mode}, world size {p.world_size or '-'}")
    head.add_row("checkpoint", p.last_checkpoint or "-")
    if j.final_model:
        head.add_row("final model", f"{j.final_model}  (verified: loads, logits match the trained weights)")
    if p.last_save:
        head.add_row("last save", save_text(p.last_save, p.failed_saves))
    if phase_text(s):
        head.add_row("phase", phase_text(s))
    if not j.state.is_terminal:
        head.add_row("supervisor", supervisor_line(s))
    if s.overrides:
        head.add_row("overrides", " ".join(s.overrides))
    if j.group_id:
        head.add_row("group", f"{j.group_id}   (orchestrate status --group {j.group_id})")
    head.add_row("run dir", j.run_dir)
    head.add_row("logs", f"orchestrate logs {j.id} -f" + (f"   ({s.log_dir})" if s.log_dir else ""))
    if j.message:
        head.add_row("last event", j.message)
    for notice in p.notices:
        head.add_row("notice", Text(notice, style="yellow"))
    parts: list = [head]
    chart = loss_chart(p.losses, width=max(10, chart_width), height=chart_height,
                       marks=tuple(a.start_step for a in j.attempts[1:] if a.start_step is not None), overlay=p.evals)
    if len(p.losses) >= 2 and chart and chart_height >= 3:
        parts += loss_curve(chart, bool(p.evals))
    if j.attempts:
        parts.append(Text(""))
        parts.append(_attempts_table(s))
    for n, err in sorted(s.errors.items()):
        parts.append(Text.assemble(("first error", "bold red"), f", attempt {n}: {err.line()}"))
        parts.append(Text(f"  traceback: orchestrate logs {j.id} --attempt {n} --errors", style="dim"))
    return Group(*parts)


def save_text(save: dict, failed: int = 0) -> str:
    """``blocked training 0.24 s, written in 1.3 s (in the background)``: what the last save cost."""
    blocked, written = save.get("save_s"), save.get("write_s")
    text = f"blocked training {_num(blocked, '.2f')} s"
    if written is not None:
        text += f", written in {_num(written, '.2f')} s" + (" (in the background)" if save.get("async_write") else "")
    if save.get("reason") in ("time", "requested"):
        text += "; " + ("the time interval passed" if save["reason"] == "time" else "asked for (orchestrate checkpoint)")
    return text + (f"; {failed} failed save(s)" if failed else "")


def _summary(snaps: list[Snapshot], now: float) -> Text:
    counts: dict[JobState, int] = {}
    for s in snaps:
        counts[s.job.state] = counts.get(s.job.state, 0) + 1
    out = Text.assemble(("orchestrate", "bold"), f"  {len(snaps)} job(s)")
    for state in JobState:
        if counts.get(state):
            out.append(f"  {counts[state]} ")
            out.append(state.value, style=STATE_STYLE[state])
    out.append(time.strftime("   %H:%M:%S", time.localtime(now)), style="dim")
    return out


def status_frame(snaps: list[Snapshot], now: float, max_rows: int | None = None, hint: str | None = None) -> Group:
    """The all-jobs view: a summary line, the table and an optional hint line."""
    from .groups import in_blocks

    parts: list = [_summary(snaps, now), jobs_table(in_blocks(order_for_status(snaps)), max_rows)]
    if hint:
        parts.append(Text(hint, style="dim"))
    return Group(*parts)


def detail_frame(s: Snapshot, hint: str | None = None, width: int | None = None, height: int | None = None) -> Group:
    """One job in detail under an optional hint line (what Ctrl-C does: on top, never cropped).

    Given the terminal's ``width``/``height``, the loss curve shrinks (or goes) so that the
    attempts table still fits.
    """
    chart_w, chart_h = 60, 8
    if width is not None:
        chart_w = min(chart_w, width - 10)
    if height is not None:
        rest = 15 + (2 if hint else 0) + (2 if s.goodput else 0) + (1 if s.progress.last_eval else 0) \
            + 2 * len(s.errors) + (4 + len(s.job.attempts) if s.job.attempts else 0)
        chart_h = min(chart_h, height - rest)
    detail = job_detail(s, chart_w, chart_h)
    return Group(Text(hint, style="bold yellow"), detail) if hint else detail


def snapshot_json(s: Snapshot, detail: bool = False) -> dict[str, Any]:
    """Machine-readable form (``--json``); non-finite numbers (a diverged loss) become ``null``."""
    j, p = s.job, s.progress
    data = j.to_json()
    data.update(
        step=_step(s), max_steps=_total(s), loss=_clean(p.loss), tokens_per_s=_clean(p.tokens_per_s),
        eta_s=_clean(_eta(s)), elapsed_s=round(_elapsed(s), 3), attempt=len(j.attempts),
        attempt_budget=attempt_budget(s),
        last_checkpoint=p.last_checkpoint, last_checkpoint_step=p.last_checkpoint_step, last_save=p.last_save,
        failed_saves=p.failed_saves,
        distributed_type=p.distributed_type or j.distributed_type, fsdp_version=p.fsdp_version,
        world_size=p.world_size, log_dir=s.log_dir,
        supervisor=(s.supervisor or SupervisorHealth(alive=False)).to_json(),
        notices=list(p.notices), goodput=s.goodput, **eval_json(p),
        phase=(s.heartbeat or {}).get("phase") if not j.state.is_terminal else None,
        first_errors={str(n): {"rank": e.rank, "summary": e.summary, "step": e.step, "time": e.time,
                               "record": e.source} for n, e in s.errors.items()},
    )
    data["overrides"] = list(s.overrides)
    for k, a in enumerate(data["attempts"]):   # issue 19: steps trained after the point resumed from are lost
        a["steps_kept"], a["steps_lost"] = steps_kept(s, k)
    if detail:
        data["losses"] = [[step, _clean(v)] for step, v in p.losses]
        data["evals"] = [[step, _clean(v)] for step, v in p.evals]
    return data

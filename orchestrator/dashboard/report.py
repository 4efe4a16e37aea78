"""``orchestrate report``: a PNG of loss (eval loss as points) and tokens/s over steps, attempt boundaries
marked, and a timeline of the attempts over wall-clock time coloured by what the time went to (goodput).

matplotlib is an optional extra (``pip install 'orchestrate[report]'``); it is imported
only here, only when a report is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..store.goodput import GOODPUT, Account
from ..store.goodput_read import job_account
from ..store.ledger import Job
from ..store.paths import RunPaths
from ..store.progress import eval_loss
from ..worker.channel import iter_jsonl

INSTALL_HINT = ("the report needs matplotlib, which is not installed: "
                "pip install 'orchestrate[report]'  (or: pip install matplotlib)")


class ReportUnavailable(RuntimeError):
    """matplotlib is missing (the CLI exits 2 with this message)."""


@dataclass
class Series:
    """One attempt's points, read from the progress file."""

    attempt: int
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    tps_steps: list[int] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    start_step: int | None = None
    world_size: int | None = None      # from the attempt's start record
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)


def read_series(progress_path: Path) -> list[Series]:
    """Per-attempt loss, tokens/s and checkpoint steps, in attempt order."""
    by_attempt: dict[int, Series] = {}
    for rec, _ in iter_jsonl(progress_path):
        n = rec.get("attempt")
        if not isinstance(n, int):
            continue
        s = by_attempt.setdefault(n, Series(n))
        step, event = rec.get("step"), rec.get("event")
        if not isinstance(step, int):
            continue
        if event == "start":
            s.start_step = step
            s.world_size = rec.get("world_size") if isinstance(rec.get("world_size"), int) else s.world_size
        elif event == "log":
            if isinstance(rec.get("loss"), (int, float)):
                s.steps.append(step)
                s.loss.append(float(rec["loss"]))
            if isinstance(rec.get("tokens_per_s"), (int, float)):
                s.tps_steps.append(step)
                s.tokens_per_s.append(float(rec["tokens_per_s"]))
        elif event == "checkpoint":
            s.checkpoints.append(step)
        elif event == "eval" and eval_loss(rec.get("metrics")) is not None:
            s.eval_steps.append(step)
            s.eval_loss.append(eval_loss(rec.get("metrics")))
    return [by_attempt[n] for n in sorted(by_attempt)]


def world_changes(series: list[Series]) -> list[tuple[int, int, int]]:
    """``(step, old world size, new)`` where an attempt resumed on another number of ranks (issue 19)."""
    out, last = [], None
    for s in series:
        if s.world_size is not None:
            if last is not None and s.world_size != last and s.start_step is not None:
                out.append((s.start_step, last, s.world_size))
            last = s.world_size
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")   # no display on a login node
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ReportUnavailable(INSTALL_HINT) from exc
    return plt


def write_report(job: Job, out: str | Path) -> Path:
    """Draw the job's loss and tokens/s per step into ``out`` (PNG); return its path."""
    plt = _pyplot()
    series = read_series(RunPaths(Path(job.run_dir)).progress)
    failures = {a.n: a.failure for a in job.attempts}
    fig = plt.figure(figsize=(10, 8.5), dpi=110)
    grid = fig.add_gridspec(3, 1, height_ratios=(3, 2, 1.6))
    ax_loss = fig.add_subplot(grid[0])
    ax_tps = fig.add_subplot(grid[1], sharex=ax_loss)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, s in enumerate(series):
        color = colors[k % len(colors)]
        label = f"attempt {s.attempt}" + (f" ({failures[s.attempt]})" if failures.get(s.attempt) else "")
        ax_loss.plot(s.steps, s.loss, marker=".", color=color, label=label)
        ax_tps.plot(s.tps_steps, s.tokens_per_s, marker=".", color=color, label=label)
        if s.eval_steps:
            ax_loss.plot(s.eval_steps, s.eval_loss, marker="D", markersize=6, linestyle=":", color=color,
                         markeredgecolor="black", label=f"eval loss, attempt {s.attempt}")
        for step in s.checkpoints:
            ax_loss.axvline(step, color=color, alpha=0.15, linewidth=1)
        if k and s.start_step is not None:
            for ax in (ax_loss, ax_tps):
                ax.axvline(s.start_step, color=color, linestyle="--", linewidth=1.2)
            ax_loss.annotate(f"attempt {s.attempt}", (s.start_step, 1.0), xycoords=("data", "axes fraction"),
                             xytext=(3, -12), textcoords="offset points", color=color, fontsize=8)
    for step, old, new in world_changes(series):   # throughput changes with the world size: say why
        for ax in (ax_loss, ax_tps):
            ax.axvline(step, color="black", linestyle=":", linewidth=1.5)
        ax_tps.annotate(f"world size {old} -> {new}", (step, 0.0), xycoords=("data", "axes fraction"),
                        xytext=(3, 4), textcoords="offset points", fontsize=8, fontweight="bold")
    ax_loss.set_ylabel("loss")
    ax_tps.set_ylabel("tokens/s")
    ax_tps.set_ylim(bottom=0)   # a rate read against 0, so that a dip looks as large as it is
    ax_tps.set_xlabel("step  (dashed: an attempt resumed here; faint: checkpoints)")
    for ax in (ax_loss, ax_tps):
        ax.grid(alpha=0.3)
    if series:
        ax_loss.legend(loc="upper right", fontsize=8)
    else:
        ax_loss.text(0.5, 0.5, "no progress recorded yet", ha="center", va="center", transform=ax_loss.transAxes)
    draw_timeline(fig.add_subplot(grid[2]), job_account(job))
    fig.suptitle(f"{job.id}  ({job.name}, {job.backend})  {job.state.value}, step {job.step}/{job.max_steps or '?'}")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.absolute()


PHASE_COLORS = {GOODPUT: "#2ca02c", "lost": "#d62728", "startup": "#ff7f0e", "restore": "#bcbd22",
                "checkpoint": "#1f77b4", "eval": "#9467bd", "waiting": "#7f7f7f", "queue": "#c7c7c7",
                "final_check": "#17becf", "other": "#e7e7e7"}
PHASE_LABELS = {GOODPUT: "training (kept)", "lost": "lost (redone)", "startup": "start-up", "restore": "restore",
                "checkpoint": "save", "eval": "eval", "waiting": "waiting", "queue": "queue",
                "final_check": "final check", "other": "other"}


def draw_timeline(ax, acc: Account) -> None:
    """One row per attempt over wall-clock minutes since submit, each span coloured by its phase."""
    if not acc.spans:
        ax.set_axis_off()
        return
    t0 = acc.spans[0].start
    rows = [a.n for a in acc.attempts] or [None]
    seen = set()
    for span in acc.spans:   # after the last attempt (the job's end, or waiting for the next one): its row
        row = rows.index(span.attempt) if span.attempt in rows else len(rows) - 1
        label = None if span.cause in seen else PHASE_LABELS[span.cause]
        seen.add(span.cause)
        ax.broken_barh([((span.start - t0) / 60, (span.end - span.start) / 60)], (row - 0.4, 0.8),
                       color=PHASE_COLORS[span.cause], label=label)
    ax.set_yticks(range(len(rows)), [f"attempt {n}" if n else "no attempt yet" for n in rows])
    ax.invert_yaxis()
    ax.set_xlabel("minutes since submit")
    summary = acc.to_json()
    frac = summary["fraction"]
    ax.set_title(f"goodput {100 * frac:.0f}% of {summary['wall_s'] / 60:.1f} min" if frac is not None else "timeline",
                 fontsize=9, loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    ax.grid(axis="x", alpha=0.3)

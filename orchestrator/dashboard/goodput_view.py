"""Evaluation and goodput in the views (issues 16.2 and 20): pure, numbers in, text (or JSON) out.

The job detail's ``eval``, ``goodput`` and ``step time`` rows, the jobs table's cells, the
``--json`` fields and the end summary's goodput line. The account itself is computed in
:mod:`orchestrator.store.goodput`; here it arrives as its JSON form (``Account.to_json()``).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from rich.text import Text

from ..store.progress import ProgressState
from .charts import EVAL_MARK, bar, sparkline

CAUSE_LABEL = {"queue": "queue", "startup": "start-up", "restore": "restore", "checkpoint": "checkpoints",
               "eval": "eval", "lost": "lost progress", "waiting": "waiting", "final_check": "final check",
               "other": "other"}
_EVAL_POINTS = 24


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _finite(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


# -- evaluation ------------------------------------------------------------------------------------

def eval_json(p: ProgressState) -> dict[str, Any]:
    """``last_eval`` (step, epoch, eval_loss, every metric) and ``best_eval`` (step, eval_loss) for ``--json``."""
    last = None
    if p.last_eval:
        metrics = {k: _finite(v) if isinstance(v, float) else v for k, v in (p.last_eval.get("metrics") or {}).items()}
        last = {"step": p.last_eval.get("step"), "epoch": p.last_eval.get("epoch"),
                "eval_loss": _finite(p.last_eval.get("eval_loss")), "eval_s": p.last_eval.get("eval_s"),
                "metrics": metrics}
    best = {"step": p.best_eval["step"], "eval_loss": _finite(p.best_eval["eval_loss"])} if p.best_eval else None
    return {"last_eval": last, "best_eval": best}


def eval_text(p: ProgressState) -> Text | None:
    """``last 1.2345 (step 20)   best 1.2001 (step 10)   ▇▅▃▂``; ``None`` before the first evaluation."""
    if not p.last_eval:
        return None
    loss = p.last_eval.get("eval_loss")
    out = Text(f"last {_loss(loss)} (step {p.last_eval.get('step')})")
    if p.best_eval:
        out.append(f"   best {_loss(p.best_eval['eval_loss'])} (step {p.best_eval['step']})")
    if len(p.evals) >= 2:
        out.append("   ")
        out.append(sparkline([v for _, v in p.evals], _EVAL_POINTS), style="magenta")
    return out


def _loss(v) -> str:
    return "-" if not isinstance(v, (int, float)) else format(v, ".4f")


def eval_cell(p: ProgressState) -> str:
    """The jobs table's ``eval`` cell: the last eval loss."""
    return _loss((p.last_eval or {}).get("eval_loss"))


# -- goodput ---------------------------------------------------------------------------------------

def top_causes(g: Mapping[str, Any], n: int = 3) -> list[tuple[str, float]]:
    """The ``n`` biggest badput causes, largest first (only those with time)."""
    causes = sorted(((c, s) for c, s in (g.get("badput_s") or {}).items() if s and s > 0), key=lambda cs: -cs[1])
    return causes[:n]


def goodput_cell(g: Mapping[str, Any] | None) -> str:
    """The jobs table's ``goodput`` cell: ``72%``."""
    frac = (g or {}).get("fraction")
    return "-" if frac is None else f"{100 * frac:.0f}%"


def only_shown_columns(cols: list, rows: list, snaps: list) -> tuple[list, list]:
    """The jobs table without its ``eval`` / ``goodput`` column when no job shown has one to show."""
    empty = {"eval": not any(s.progress.last_eval for s in snaps), "goodput": not any(s.goodput for s in snaps)}
    drop = {i for i, c in enumerate(cols) if empty.get(c.name)}
    if not drop:
        return cols, rows
    return ([c for i, c in enumerate(cols) if i not in drop],
            [[c for i, c in enumerate(r) if i not in drop] if isinstance(r, list) else r for r in rows])


def goodput_text(g: Mapping[str, Any] | None, width: int = 20) -> Text | None:
    """``███████░░░ 72% of 4:10 kept (0.23 of 0.32 GPU-h)   badput: lost progress 0:31, start-up 0:22``."""
    if not g or g.get("fraction") is None:
        return None
    done, rest = bar(g["fraction"], width)
    gpu = g.get("gpu_hours") or {}
    out = Text.assemble((done, "green"), (rest, "red"),
                        f" {100 * g['fraction']:.0f}% of {_fmt_s(g['wall_s'])} kept")
    if gpu:
        out.append(f" ({gpu.get('goodput', 0):.2f} of {gpu.get('total', 0):.2f} GPU-h)")
    causes = top_causes(g)
    if causes:
        out.append("   badput: ")
        out.append(", ".join(f"{CAUSE_LABEL.get(c, c)} {_fmt_s(s)}" for c, s in causes), style="yellow")
    return out


def step_time_text(g: Mapping[str, Any] | None) -> Text | None:
    """``median 0.41 s (attempt 2: 1.10 s), 3 slow steps (> 2x median); slowest rank 3 on n2 ...``."""
    attempts = [a for a in (g or {}).get("attempts") or [] if (a.get("step_time") or {}).get("median_s")]
    if not attempts:
        return None
    parts = []
    for a in attempts[-3:]:
        st = a["step_time"]
        part = f"attempt {a['n']}: median {st['median_s']:.3g} s"
        if st.get("slow_steps"):
            part += f", {st['slow_steps']} slow (> {st['slow_factor']:g}x, worst {st['worst_s']:.3g} s)"
        parts.append(part)
    out = Text("; ".join(parts))
    slow = _straggler(attempts[-1].get("slowest_rank"), attempts[-1]["step_time"]["median_s"])
    if slow:
        out.append("; " + slow, style="yellow")
    return out


def _straggler(r: Mapping[str, Any] | None, median_step: float) -> str | None:
    """The rank the others waited for, when it stands out (10% of a step, and 5 ms, over the others)."""
    if not r:
        return None
    lag = r["between_s"] - r["others_between_s"]
    if lag < max(0.1 * median_step, 0.005):
        return None
    where = f" on {r['host']}" if r.get("host") and r.get("hosts", 1) > 1 else ""
    return (f"slowest rank {r['rank']}{where}: {r['between_s']:.3g} s between steps against "
            f"{r['others_between_s']:.3g} s on the others")


def summary_line(g: Mapping[str, Any] | None) -> str | None:
    """The end summary's goodput line (plain text)."""
    if not g or g.get("fraction") is None:
        return None
    gpu = g.get("gpu_hours") or {}
    causes = ", ".join(f"{CAUSE_LABEL.get(c, c)} {_fmt_s(s)}" for c, s in top_causes(g))
    return (f"  goodput:     {100 * g['fraction']:.0f}% of {_fmt_s(g['wall_s'])} kept as training progress"
            + (f" ({gpu.get('badput', 0):.2f} of {gpu.get('total', 0):.2f} GPU-h went elsewhere)" if gpu else "")
            + (f"; badput: {causes}" if causes else ""))


# -- the job detail --------------------------------------------------------------------------------

def detail_rows(p: ProgressState, g: Mapping[str, Any] | None) -> list[tuple[str, Text]]:
    """The job detail's ``eval loss``, ``goodput`` and ``step time`` rows, those that have something to say."""
    rows = [("eval loss", eval_text(p)), ("goodput", goodput_text(g)), ("step time", step_time_text(g))]
    return [(name, row) for name, row in rows if row is not None]


def loss_curve(chart: list[str], evals: bool) -> list[Text]:
    """The loss chart's title and body, eval points (``EVAL_MARK``) in their own colour."""
    title = Text("\nloss" + (f"   ({EVAL_MARK} = eval loss)" if evals else "")
                 + ("   (┴ = an attempt resumed here)" if "┴" in chart[-2] else ""), style="bold")
    curve = Text("\n".join(chart), style="cyan", no_wrap=True, overflow="crop")
    curve.highlight_words([EVAL_MARK], style="bold magenta")
    return [title, curve]

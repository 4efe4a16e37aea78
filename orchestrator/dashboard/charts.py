"""Small text charts for the terminal (pure functions on numbers; no I/O, no rich)."""
from __future__ import annotations

import bisect
import math

_SPARK = "▁▂▃▄▅▆▇█"
_EIGHTHS = " ▁▂▃▄▅▆▇█"      # vertical: 0..8 eighths of a cell
_HBAR = " ▏▎▍▌▋▊▉█"         # horizontal: 0..8 eighths of a cell


def sparkline(values: list[float], width: int = 24) -> str:
    """One character per value; a non-finite value (a diverged loss: NaN/inf) shows as '!'."""
    values = values[-width:]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "!" * len(values)
    lo = min(finite)
    scale = (len(_SPARK) - 1) / ((max(finite) - lo) or 1.0)
    top = len(_SPARK) - 1
    return "".join(_SPARK[min(top, int((v - lo) * scale))] if math.isfinite(v) else "!" for v in values)


def bar(fraction: float, width: int) -> tuple[str, str]:
    """``(done, rest)`` parts of a horizontal progress bar ``width`` cells wide (eighth-cell steps)."""
    fraction = min(1.0, max(0.0, fraction if math.isfinite(fraction) else 0.0))
    eighths = int(round(fraction * width * 8))
    full, part = divmod(eighths, 8)
    done = "█" * full + (_HBAR[part] if part else "")
    return done, "░" * (width - len(done))


def _fmt(v: float) -> str:
    return f"{v:.4g}"


EVAL_MARK = "●"


def loss_chart(points: list[tuple[int, float]], width: int = 60, height: int = 8,
               marks: tuple[int, ...] = (), overlay: list[tuple[int, float]] = ()) -> list[str]:
    """A bar chart of ``(step, value)`` points, ``height`` rows of unicode blocks plus an axis row.

    Columns are spread evenly over the step range (the newest value of a step wins, so a
    resumed attempt overwrites the steps it repeated). Non-finite values show as ``!``.
    ``marks`` are steps where an attempt started (resumed): ``┴`` on the axis under them.
    ``overlay`` (eval loss) points are drawn as ``EVAL_MARK`` at their height, on the same scale.
    Returns the lines; empty when there is nothing to draw.
    """
    by_step: dict[int, float] = {}
    for step, value in points:
        by_step[step] = value
    if not by_step:
        return []
    steps = sorted(by_step)
    lo_s, hi_s = steps[0], steps[-1]
    if len(steps) <= width:        # few points: each gets the same number of columns
        per = max(1, width // len(steps))
        ncols = per * len(steps)

        def col_of(step: int) -> int:
            return min(ncols - 1, bisect.bisect_left(steps, step) * per)
    else:                          # many points: spread the step range over the columns
        ncols = width

        def col_of(step: int) -> int:
            return min(ncols - 1, int((step - lo_s) / (hi_s - lo_s) * (ncols - 1) + 0.5))

    column: list[float | None] = [None] * ncols
    for step in steps:
        c = col_of(step)
        if column[c] is None or math.isfinite(column[c]):   # a NaN in a bucket stays visible
            column[c] = by_step[step]
    for k in range(1, ncols):      # a point spans the columns up to the next one
        if column[k] is None:
            column[k] = column[k - 1]
    extra = [(col_of(min(max(s, lo_s), hi_s)), v) for s, v in overlay if math.isfinite(v)]
    finite = [v for v in column if v is not None and math.isfinite(v)] + [v for _, v in extra]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = (hi - lo) or 1.0

    def level(v: float) -> int:   # at least one eighth so the lowest value is still visible
        return max(1, int(round((v - lo) / span * (height * 8 - 1))) + 1)

    levels = [0 if v is None else -1 if not math.isfinite(v) else level(v) for v in column]
    dots = {c: (level(v) + 7) // 8 for c, v in extra}   # column -> the row (1 = bottom) of its point
    label_w = max(len(_fmt(hi)), len(_fmt(lo)))
    rows = []
    for r in range(height, 0, -1):
        cells = []
        for c, lv in enumerate(levels):
            if dots.get(c) == r:
                cells.append(EVAL_MARK)
            elif lv < 0:
                cells.append("!" if r == height else " ")
            else:
                cells.append(_EIGHTHS[min(8, max(0, lv - (r - 1) * 8))])
        label = _fmt(hi) if r == height else _fmt(lo) if r == 1 else ""
        rows.append(f"{label:>{label_w}} ┤{''.join(cells)}")
    axis = ["─"] * ncols
    for m in marks:
        if lo_s < m <= hi_s:
            axis[col_of(m)] = "┴"
    rows.append(" " * label_w + " └" + "".join(axis))
    left, right = f"step {lo_s}", f"{hi_s}"
    gap = max(1, ncols - len(left) - len(right))
    rows.append(" " * (label_w + 2) + left + " " * gap + right)
    return rows

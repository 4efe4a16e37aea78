"""Goodput figures for the benches (issue 20): each job's ``status --json`` ``"goodput"`` in, text out.

Used by ``recovery.py`` (each fault's goodput and lost progress) and ``chaos.py`` (the campaign's
goodput distribution beside its invariants). The account itself is ``orchestrator/store/goodput.py``.
"""
from __future__ import annotations

import statistics

CAUSES = ("queue", "startup", "restore", "checkpoint", "eval", "lost", "waiting", "final_check", "other")


def _top(badput: dict, n: int = 3) -> str:
    causes = sorted(((c, s) for c, s in badput.items() if s > 0), key=lambda cs: -cs[1])[:n]
    return ", ".join(f"{c} {s:.1f} s" for c, s in causes) or "-"


def fault_table(rows: list[dict]) -> str:
    """Markdown: per fault, goodput, lost progress (s and steps) and the biggest badput causes."""
    out = ["| fault | goodput | wall | lost progress | waiting | biggest badput |", "|---|---|---|---|---|---|"]
    for r in rows:
        g = r.get("goodput") or {}
        if g.get("fraction") is None:
            out.append(f"| ({r['fault']}) {r['what']} | - | - | - | - | - |")
            continue
        lost_steps = sum(a["steps"]["lost"] for a in g.get("attempts", []))
        out.append(f"| ({r['fault']}) {r['what']} | {100 * g['fraction']:.0f}% | {g['wall_s']:.1f} s | "
                   f"{g['badput_s']['lost']:.1f} s ({lost_steps} steps) | {g['badput_s']['waiting']:.1f} s | "
                   f"{_top(g['badput_s'])} |")
    return "\n".join(out)


def distribution(goodputs: list[dict | None]) -> dict:
    """A campaign's goodput: fraction min / median / max, and the median seconds of each badput cause."""
    found = [g for g in goodputs if g and g.get("fraction") is not None]
    if not found:
        return {"jobs": 0}
    fractions = sorted(g["fraction"] for g in found)
    return {"jobs": len(found), "fraction": {"min": fractions[0], "median": round(statistics.median(fractions), 4),
                                             "max": fractions[-1]},
            "wall_s_median": round(statistics.median(g["wall_s"] for g in found), 1),
            "badput_s_median": {c: round(statistics.median(g["badput_s"].get(c, 0.0) for g in found), 2)
                                for c in CAUSES}}

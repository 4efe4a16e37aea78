"""The timestamps goodput needs that no other record has (issue 20), and the eval record (issue 16.2).

Called from :class:`~orchestrator.worker.callback.OrchestrateCallback`, a line per hook:

* :func:`eval_fields`: the ``eval`` progress record's fields (every metric the trainer reported,
  prefix kept; ``eval_s``, how long the evaluation took);
* :class:`RestoreTimer`: how long loading the checkpoint took on resume (``restore_s`` in the
  ``start`` record), timed around the Trainer's own loading methods;
* :class:`StepClock`: this rank's step times, written to ``steps-rank<R>.json`` in its attempt
  directory every few seconds, so that the orchestrator can tell the median step time, slow steps,
  and, on multi-node jobs, which rank (on which host) kept the others waiting.

Nothing here is on the training path beyond a ``time.time()`` per hook and a small atomic write
every ``StepClock.WRITE_EVERY_S``.
"""
from __future__ import annotations

import functools
import json
import math
import os
import socket
import statistics
import time
from pathlib import Path


STEPS_FILE_PREFIX = "steps-rank"      # <attempt_dir>/steps-rank<R>.json, one per rank
# Trainer methods that load a checkpoint on resume (transformers 4.4x-5.x); a missing one is skipped.
RESTORE_METHODS = ("_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_scaler")


def steps_file_name(rank: int) -> str:
    return f"{STEPS_FILE_PREFIX}{rank}.json"


def _number(v):
    """A metric as JSON: numbers as floats (ints stay ints), anything else as its text."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def eval_fields(metrics: dict | None, epoch, phase: str | None, phase_since: float | None,
                now: float) -> dict:
    """``{"epoch", "metrics", "eval_s"}`` of an ``eval`` record (contract 1 in TEAM.md).

    ``eval_s`` is measured from the heartbeat's ``evaluating`` phase, which the save hooks enter
    when ``evaluate`` starts (``on_evaluate`` runs inside it); without it, the trainer's own
    ``*_runtime`` metric (the evaluation loop alone).
    """
    metrics = {str(k): _number(v) for k, v in (metrics or {}).items()}
    eval_s = None
    if phase == "evaluating" and isinstance(phase_since, (int, float)):
        eval_s = max(0.0, now - phase_since)
    else:
        runtime = [v for k, v in metrics.items() if k.endswith("_runtime") and isinstance(v, (int, float))]
        eval_s = float(runtime[0]) if runtime else None
    return {"epoch": epoch if isinstance(epoch, (int, float)) else None, "metrics": metrics,
            "eval_s": None if eval_s is None else round(eval_s, 3)}


class RestoreTimer:
    """Seconds spent in the Trainer's checkpoint-loading methods (model, optimizer, scheduler, scaler)."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def install(self, trainer) -> "RestoreTimer":
        for name in RESTORE_METHODS:
            fn = getattr(trainer, name, None)
            if callable(fn):
                setattr(trainer, name, self._timed(fn))
        return self

    def _timed(self, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            t0 = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.time() - t0
                self.calls += 1
        return wrapped

    def fields(self, resumed: bool) -> dict:
        """``{"restore_s": s}`` for a resumed attempt's start record (nothing when nothing was timed)."""
        return {"restore_s": round(self.seconds, 3)} if resumed and self.calls else {}


class StepClock:
    """One rank's step times: ``on_step_begin`` to ``on_step_end`` (the step) and ``on_step_end`` to the
    next ``on_step_begin`` (between steps: logging, the next batch, saves and evaluations).

    Every rank of a synchronous job takes about as long per step (the collectives wait for the
    slowest), so the step time alone cannot name a straggler; the time *between* steps is each
    rank's own (no collective runs there), and the rank that is last to begin a step is the one the
    others wait for in its first collective. Both medians are written per rank.
    """

    WRITE_EVERY_S = 5.0

    def __init__(self, attempt_dir, rank: int, clock=time.time):
        self.path = Path(attempt_dir) / steps_file_name(rank)
        self.rank, self.clock = rank, clock
        self.host = socket.gethostname()
        self.step_s: list[float] = []
        self.between_s: list[float] = []
        self._begin: float | None = None
        self._end: float | None = None
        self._written = 0.0
        self.first_step: int | None = None

    def begin(self, step: int) -> None:
        now = self.clock()
        if self._end is not None:
            self.between_s.append(now - self._end)
        if self.first_step is None:
            self.first_step = step
        self._begin = now

    def end(self) -> None:
        now = self.clock()
        if self._begin is not None:
            self.step_s.append(now - self._begin)
        self._end, self._begin = now, None
        if now - self._written >= self.WRITE_EVERY_S:
            self.write()

    def summary(self) -> dict:
        return {"rank": self.rank, "host": self.host, "time": round(self.clock(), 3), "first_step": self.first_step,
                "steps": len(self.step_s), "step_s": _stats(self.step_s[1:] or self.step_s),
                "between_s": _stats(self.between_s)}

    def write(self) -> None:
        """Best effort and without fsync (this runs on the training path): replaced whole, never half-written."""
        self._written = self.clock()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.summary(), sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass   # a full disk must not stop training for a statistic


def _stats(values: list[float]) -> dict | None:
    """``median``, ``p90`` and ``max`` (s), rounded (the first step, warm-up, is left out by the caller)."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return None
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 4), "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 4),
            "max": round(ordered[-1], 4), "n": len(ordered)}

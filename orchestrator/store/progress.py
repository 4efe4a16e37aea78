"""Incremental, cheap reading of a job's progress file (shared by the supervisor and the dashboard)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..worker.channel import HEARTBEAT_FILE, iter_jsonl, read_json


@dataclass
class ProgressState:
    """What the progress records say so far; updated in place by :class:`ProgressFollower`."""

    step: int = 0
    max_steps: int | None = None
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    distributed_type: str | None = None
    fsdp_version: int | None = None
    world_size: int | None = None
    last_checkpoint: str | None = None
    last_checkpoint_step: int | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)   # what the worker wants the user to know (once each)
    save_s: list[float] = field(default_factory=list)  # how long each checkpoint save blocked training
    last_save: dict | None = None  # the last checkpoint record: blocked (save_s), written (write_s), async, why
    failed_saves: int = 0          # saves whose write failed (no marker: the previous checkpoint stays)
    attempt_records: int = 0      # records of the attempt being followed
    last_attempt: int | None = None
    # contract 1 (TEAM.md): the worker's eval records
    last_eval: dict | None = None  # the last evaluation: step, epoch, eval_loss, metrics (every one), eval_s
    best_eval: dict | None = None  # the lowest eval_loss, same keys (a step evaluated again: its newest value)
    evals: list[tuple[int, float]] = field(default_factory=list)   # (step, eval_loss), a step's newest last
    rate_start: tuple[float, int] | None = None   # (time, step) of the latest attempt's first log
    rate_end: tuple[float, int] | None = None

    @property
    def steps_per_s(self) -> float | None:
        if not self.rate_start or not self.rate_end or self.rate_end[0] <= self.rate_start[0]:
            return None
        return (self.rate_end[1] - self.rate_start[1]) / (self.rate_end[0] - self.rate_start[0])

    def eta_s(self) -> float | None:
        rate = self.steps_per_s
        if not rate or not self.max_steps:
            return None
        return max(0.0, (self.max_steps - self.step) / rate)


class ProgressFollower:
    """Reads new lines of ``progress.jsonl`` from where it stopped last time."""

    def __init__(self, path: Path, attempt: int | None = None):
        self.path = Path(path)
        self.attempt = attempt
        self.offset = 0
        self.state = ProgressState()

    def poll(self) -> list[dict]:
        """Apply and return the records appended since the last call."""
        new = []
        for rec, offset in iter_jsonl(self.path, self.offset):
            self.offset = offset
            self._apply(rec)
            new.append(rec)
        return new

    def _apply(self, rec: dict) -> None:
        s = self.state
        if self.attempt is not None and rec.get("attempt") == self.attempt:
            s.attempt_records += 1
        event = rec.get("event")
        if isinstance(rec.get("step"), int):
            s.step = rec["step"]
        if rec.get("max_steps"):
            s.max_steps = rec["max_steps"]
        if event == "start":
            s.distributed_type = rec.get("distributed_type")
            s.fsdp_version = rec.get("fsdp_version")
            s.world_size = rec.get("world_size")
        elif event == "log":
            if rec.get("attempt") != s.last_attempt:
                s.last_attempt, s.rate_start = rec.get("attempt"), None
            if isinstance(rec.get("time"), (int, float)):
                point = (float(rec["time"]), s.step)
                s.rate_start = s.rate_start or point
                s.rate_end = point
            for key in ("loss", "learning_rate", "grad_norm", "tokens", "tokens_per_s"):
                if rec.get(key) is not None:
                    setattr(s, key, rec[key])
            if isinstance(rec.get("loss"), (int, float)):
                s.losses.append((s.step, float(rec["loss"])))
        elif event == "notice":
            text = str(rec.get("message") or "")
            if text and text not in s.notices:
                s.notices.append(text)
        elif event == "checkpoint":
            if isinstance(rec.get("save_s"), (int, float)):
                s.save_s.append(float(rec["save_s"]))
            s.last_checkpoint = rec.get("path")
            s.last_checkpoint_step = rec.get("step")
            s.last_save = {k: rec.get(k) for k in ("step", "save_s", "write_s", "async_write", "reason")}
        elif event == "checkpoint_failed":
            s.failed_saves += 1
        elif event == "eval":
            apply_eval(s, rec)


def eval_loss(metrics: dict | None) -> float | None:
    """``eval_loss``, or the first ``*_loss`` (several eval sets: ``eval_<name>_loss``)."""
    metrics = metrics if isinstance(metrics, dict) else {}
    value = metrics.get("eval_loss")
    if not isinstance(value, (int, float)):
        value = next((v for k, v in sorted(metrics.items()) if k.endswith("_loss") and isinstance(v, (int, float))),
                     None)
    return None if value is None or isinstance(value, bool) else float(value)


def apply_eval(s: ProgressState, rec: dict) -> None:
    """An ``eval`` record (contract 1 in TEAM.md) into the state: last, best, the curve."""
    loss, step = eval_loss(rec.get("metrics")), rec.get("step")
    s.last_eval = {"step": step, "epoch": rec.get("epoch"), "eval_loss": loss, "attempt": rec.get("attempt"),
                   "time": rec.get("time"), "eval_s": rec.get("eval_s"), "metrics": dict(rec.get("metrics") or {})}
    if loss is None or not isinstance(step, int):
        return
    redo = any(st == step for st, _ in s.evals)
    s.evals = [(st, v) for st, v in s.evals if st != step] + [(step, loss)]
    best = s.best_eval
    if math.isfinite(loss) and (best is None or loss < best["eval_loss"] or best["step"] == step):
        s.best_eval = s.last_eval
    if redo:   # the step's earlier value may have been the best: look again (only the curve is kept)
        finite = [(v, st) for st, v in s.evals if math.isfinite(v)]
        if not finite:
            s.best_eval = None
        elif s.best_eval is None or s.best_eval["step"] != min(finite)[1]:
            v, st = min(finite)
            s.best_eval = {"step": st, "epoch": None, "eval_loss": v, "metrics": {"eval_loss": v}, "eval_s": None}


def read_heartbeat(attempt_dir: Path) -> dict | None:
    """Rank 0's latest liveness beat of an attempt (``heartbeat.json``; under SLURM in its node's folder)."""
    rec = read_json(Path(attempt_dir) / HEARTBEAT_FILE)
    if rec is None:
        for path in sorted(Path(attempt_dir).glob(f"nodes/*/{HEARTBEAT_FILE}")):
            rec = read_json(path)
            if rec is not None:
                break
    return rec

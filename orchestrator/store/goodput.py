"""Goodput: how much of a job's machine time became kept training progress, and where the rest went.

Pure (issue 20): :class:`JobFacts`, the job's own records across attempts and hosts (read by
:mod:`.goodput_read`), in; an :class:`Account` out. Every second from submit to the job's end (or
now) lands in exactly one :class:`Span`, so the parts add up to the wall time:

* ``goodput``: training steps that were kept, i.e. not trained again after a rollback (and, once
  a job ended without completing, not past its last checkpoint);
* ``queue``: waiting for an allocation (SLURM pending: from submit or a requeue to the
  allocation's start, ``slurm/allocations.jsonl``);
* ``startup``: attempt start to the worker's first step (launch, imports, model load, sharding),
  less ``restore``: loading the checkpoint on resume (``restore_s`` of the ``start`` record);
* ``checkpoint``: saves that blocked training (``save_s`` from each save's ``started``), and the
  final or stop save between the last step and the worker's ``end`` record;
* ``eval``: evaluations (``eval_s`` of each ``eval`` record);
* ``lost``: training steps that were thrown away (trained, then redone after a rollback), and
  the step in progress when an attempt died (at most one median step: beyond that the rank was
  not training but stuck, which counts as ``waiting``);
* ``waiting``: between attempts (backoff, detection of a dead or stuck attempt, the allocation's
  supervisor starting up);
* ``final_check``: verifying the final model (``attempts/<n>/final_check.json``);
* ``other``: the rest (process teardown, logging between evaluations and saves, bookkeeping).

Step time comes from the marks the worker records: the ``start`` record, each ``log``, each save's
``started`` and each evaluation's start, with the saves' and evaluations' own time taken out; a
span between two marks is spread evenly over its steps.
"""
from __future__ import annotations

import bisect
import statistics
from dataclasses import dataclass, field

CAUSES = ("queue", "startup", "restore", "checkpoint", "eval", "lost", "waiting", "final_check", "other")
GOODPUT = "goodput"
SLOW_FACTOR = 2.0      # a step slower than this times the attempt's median step is a slow step
COMPLETED, STOPPED, FAILED = "completed", "stopped", "failed"   # the worker's end records (worker/channel.py)


@dataclass
class AttemptFacts:
    """One attempt as its records tell it."""

    n: int
    started: float
    ended: float | None = None
    world_size: int | None = None
    start_step: int | None = None            # the verified step it resumed from (the ledger's)
    records: list[dict] = field(default_factory=list)   # its progress records
    last_beat: float | None = None           # rank 0's last heartbeat (epoch s): its last sign of life
    final_check: dict | None = None          # attempts/<n>/final_check.json
    ranks: list[dict] = field(default_factory=list)     # steps-rank<R>.json of each rank


@dataclass
class JobFacts:
    """A job's records: ledger times, attempts, SLURM allocation events."""

    created: float
    end: float                               # when the job ended, or now
    state: str                               # JobState value
    attempts: list[AttemptFacts] = field(default_factory=list)
    allocations: list[dict] = field(default_factory=list)   # {"event": "started"|..., "time": s}
    queued_now: bool = False                 # it waits for an allocation now

    @property
    def terminal(self) -> bool:
        return self.state in ("COMPLETED", "FAILED", "CANCELLED")


@dataclass(frozen=True)
class Span:
    start: float
    end: float
    cause: str                               # GOODPUT or one of CAUSES
    attempt: int | None                      # None: after the last attempt


@dataclass
class AttemptAccount:
    """One attempt's share: the wait before it, its own time, its step times."""

    n: int
    world_size: int
    seconds: dict[str, float] = field(default_factory=lambda: {c: 0.0 for c in (GOODPUT, *CAUSES)})
    step_s: list[tuple[float, int, bool]] = field(default_factory=list)  # (s per step, steps, warm-up)
    kept_steps: int = 0
    startup: dict = field(default_factory=dict)   # launch_s (attempt start -> process start), init_s (-> first step)
    lost_steps: int = 0
    ranks: list[dict] = field(default_factory=list)

    def step_health(self, factor: float = SLOW_FACTOR) -> dict:
        """Median step time, steps slower than ``factor`` x median (the warm-up step left out), the worst."""
        steps = [(d, k) for d, k, warm in self.step_s if not warm] or [(d, k) for d, k, _ in self.step_s]
        if not steps:
            return {"median_s": None, "slow_steps": 0, "slow_factor": factor, "worst_s": None}
        median = _weighted_median(steps)
        return {"median_s": round(median, 4), "slow_steps": sum(k for d, k in steps if d > factor * median),
                "slow_factor": factor, "worst_s": round(max(d for d, _ in steps), 4)}

    def slowest_rank(self) -> dict | None:
        """The rank the others waited for: the longest median time between steps (its own work: no collective
        runs there), with its host; ``None`` for one rank or without records."""
        ranks = [r for r in self.ranks if (r.get("between_s") or {}).get("median") is not None]
        if len(ranks) < 2:
            return None
        ranks.sort(key=lambda r: r["between_s"]["median"])
        worst, rest = ranks[-1], ranks[:-1]
        others = statistics.median(r["between_s"]["median"] for r in rest)
        return {"rank": worst.get("rank"), "host": worst.get("host"), "between_s": worst["between_s"]["median"],
                "others_between_s": round(others, 4), "step_s": (worst.get("step_s") or {}).get("median"),
                "hosts": len({r.get("host") for r in ranks})}


@dataclass
class Account:
    """A job's account; :meth:`to_json` is ``status --json``'s ``"goodput"``."""

    spans: list[Span]
    attempts: list[AttemptAccount]

    def seconds(self, attempt: int | None = ...) -> dict[str, float]:
        out = {c: 0.0 for c in (GOODPUT, *CAUSES)}
        for s in self.spans:
            if attempt is ... or s.attempt == attempt:
                out[s.cause] += s.end - s.start
        return out

    @property
    def wall_s(self) -> float:
        return sum(s.end - s.start for s in self.spans)

    def gpu_hours(self) -> dict[str, float]:
        """Cause -> world size x seconds / 3600 (each span at the world size of its attempt)."""
        sizes = {a.n: a.world_size for a in self.attempts}
        last = self.attempts[-1].world_size if self.attempts else 1
        out = {c: 0.0 for c in (GOODPUT, *CAUSES)}
        for s in self.spans:
            out[s.cause] += sizes.get(s.attempt, last) * (s.end - s.start) / 3600
        return out

    def to_json(self) -> dict:
        return {**_summary(self.seconds(), self.gpu_hours()),
                "attempts": [{"n": a.n, "world_size": a.world_size, **_summary(a.seconds),
                              "gpu_hours": round(a.world_size * sum(a.seconds.values()) / 3600, 4),
                              "steps": {"kept": a.kept_steps, "lost": a.lost_steps}, "startup": a.startup,
                              "step_time": a.step_health(), "slowest_rank": a.slowest_rank()}
                             for a in self.attempts]}


def _summary(seconds: dict[str, float], gpu: dict[str, float] | None = None) -> dict:
    wall = sum(seconds.values())
    out = {"wall_s": round(wall, 3), "goodput_s": round(seconds[GOODPUT], 3),
           "fraction": round(seconds[GOODPUT] / wall, 4) if wall > 0 else None,
           "badput_s": {c: round(seconds[c], 3) for c in CAUSES}}
    if gpu is not None:
        out["gpu_hours"] = {"total": round(sum(gpu.values()), 4), "goodput": round(gpu[GOODPUT], 4),
                            "badput": round(sum(gpu[c] for c in CAUSES), 4),
                            "by_cause": {c: round(gpu[c], 4) for c in CAUSES}}
    return out


def _weighted_median(items: list[tuple[float, int]]) -> float:
    items = sorted(items)
    total, acc = sum(k for _, k in items), 0
    for d, k in items:
        acc += k
        if 2 * acc >= total:
            return d
    return items[-1][0]


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Timeline:
    """Spans laid end to end from a cursor: whatever is added, the parts cover the wall time once."""

    def __init__(self, start: float):
        self.cursor, self.parts = start, []   # [start, end, cause, attempt]: one per run of a cause
        self.attempt: int | None = None
        self.account: AttemptAccount | None = None
        self.overheads: list[tuple[float, float, str]] = []
        self._starts: list[float] = []
        self._longest = 0.0

    @property
    def spans(self) -> list[Span]:
        return [Span(*p) for p in self.parts]

    def to(self, t: float, cause: str) -> None:
        if t > self.cursor:
            last = self.parts[-1] if self.parts else None
            if last is not None and last[1] == self.cursor and last[2] == cause and last[3] == self.attempt:
                last[1] = t                   # a run of steps is one span, not one per step
            else:
                self.parts.append([self.cursor, t, cause, self.attempt])
            if self.account is not None:
                self.account.seconds[cause] = self.account.seconds.get(cause, 0.0) + t - self.cursor
            self.cursor = t

    def set_overheads(self, overheads: list[tuple[float, float, str]]) -> None:
        """This attempt's saves and evaluations, sorted; looked up by time (a job has many steps)."""
        self.overheads = overheads
        self._starts = [o[0] for o in overheads]
        self._longest = max((o[1] - o[0] for o in overheads), default=0.0)

    def near(self, t0: float, t1: float) -> list[tuple[float, float, str]]:
        """The overheads that may overlap ``[t0, t1)``."""
        hi = bisect.bisect_left(self._starts, t1)
        lo = bisect.bisect_left(self._starts, t0 - self._longest, 0, hi)
        return self.overheads[lo:hi]

    def gap(self, end: float, default: str, facts: JobFacts, open_end: bool = False) -> None:
        """Time with no attempt running: queue until an allocation started, ``default`` after."""
        started = [e["time"] for e in facts.allocations
                   if e.get("event") == "started" and _num(e.get("time")) and self.cursor < e["time"] <= end]
        if started:
            self.to(max(started), "queue")
        elif open_end and facts.queued_now:
            self.to(end, "queue")
        self.to(end, default)

    def fill(self, end: float, budget: list[tuple[float, str]]) -> None:
        """Up to ``end``: overheads (saves, evaluations) as themselves, the free time to ``budget``'s causes
        in order (``(seconds, cause)``; the last one takes whatever is left)."""
        budget = list(budget)
        for o0, o1, cause in self.near(self.cursor, end):
            if o1 <= self.cursor or o0 >= end:
                continue
            self._free(min(o0, end), budget)
            self.to(min(o1, end), cause)
        self._free(end, budget)

    def _free(self, t: float, budget: list[tuple[float, str]]) -> None:
        while t > self.cursor:
            if len(budget) > 1 and budget[0][0] <= 0:
                budget.pop(0)
                continue
            seconds, cause = budget[0]
            step_end = t if len(budget) == 1 else min(t, self.cursor + seconds)
            if step_end <= self.cursor:       # less than the clock's resolution at this epoch: spent
                budget.pop(0)
                continue
            budget[0] = (seconds - (step_end - self.cursor), cause)
            self.to(step_end, cause)


def account(facts: JobFacts) -> Account:
    """The job's account from its records (see the module docstring for what counts as what)."""
    attempts = sorted(facts.attempts, key=lambda a: a.n)
    tl = _Timeline(facts.created)
    accounts: list[AttemptAccount] = []
    last_ckpt = max((r["step"] for a in attempts for r in a.records
                     if r.get("event") == "checkpoint" and isinstance(r.get("step"), int)), default=0)
    for i, a in enumerate(attempts):
        later = attempts[i + 1:]
        window_end = a.ended if a.ended is not None else (later[0].started if later else facts.end)
        if later:
            window_end = min(window_end, later[0].started)
        window_end = max(min(window_end, facts.end), a.started)
        keep = min((_resume_step(b) for b in later), default=None)
        if keep is None:
            keep = last_ckpt if facts.terminal and facts.state != "COMPLETED" else float("inf")
        acc = AttemptAccount(a.n, int(a.world_size or _world(a) or 1), ranks=list(a.ranks))
        tl.attempt, tl.account = a.n, acc
        tl.gap(min(a.started, facts.end), "startup" if i == 0 else "waiting", facts)
        running = a.ended is None and not later and not facts.terminal
        _attempt(tl, a, window_end, keep, running, acc)
        accounts.append(acc)
    tl.attempt = tl.account = None
    tl.set_overheads([])
    if facts.terminal:
        tl.to(facts.end, "other")
    else:
        tl.gap(facts.end, "waiting" if attempts else "startup", facts, open_end=True)
    return Account(tl.spans, accounts)


def _resume_step(a: AttemptFacts) -> int:
    if a.start_step is not None:
        return a.start_step
    start = next((r for r in a.records if r.get("event") == "start"), None)
    return int(start.get("step") or 0) if start else 0


def _world(a: AttemptFacts) -> int | None:
    start = next((r for r in a.records if r.get("event") == "start"), None)
    return start.get("world_size") if start else None


def _attempt(tl: _Timeline, a: AttemptFacts, end: float, keep: float, running: bool, acc: AttemptAccount) -> None:
    recs = [r for r in a.records if _num(r.get("time"))]
    start = next((r for r in recs if r.get("event") == "start"), None)
    end_rec = next((r for r in reversed(recs) if r.get("event") == "end"), None)
    signs = [t for t in [a.last_beat] + [r["time"] for r in recs] if _num(t)]
    alive = min(end, max(signs)) if signs else end    # no sign of life at all: it was starting until its end
    if start is None:                      # it never reached its first step
        tl.to(end if running else max(alive, tl.cursor), "startup")
        tl.to(end, "waiting")
        return
    t_begin = min(max(start["time"], a.started), end)
    restore = start.get("restore_s") if _num(start.get("restore_s")) else 0.0
    tl.to(t_begin - min(restore, max(0.0, t_begin - tl.cursor)), "startup")
    tl.to(t_begin, "restore")
    if _num(start.get("process_start")):   # the launcher's share of start-up (torchrun, srun) and the process's
        proc = min(max(start["process_start"], a.started), t_begin)
        acc.startup = {"launch_s": round(proc - a.started, 3), "init_s": round(t_begin - restore - proc, 3)}
    marks, overheads = _marks(recs, start, t_begin, end)
    tl.set_overheads(overheads)
    for (t0, s0), (t1, s1) in zip(marks, marks[1:]):
        _steps(tl, t1, s0, s1 - s0, keep, acc, warm=t0 == t_begin)
    _tail(tl, a, marks[-1], end_rec, alive, end, keep, running, acc)


def _marks(recs: list[dict], start: dict, t_begin: float, end: float):
    """``[(time, step)]`` where a step had just ended, in time order; ``[(t0, t1, cause)]`` saves and evaluations."""
    marks = [(t_begin, int(start.get("step") or 0))]
    overheads = []
    for r in recs:
        event, step = r.get("event"), r.get("step")
        if not isinstance(step, int):
            continue
        if event == "log":
            marks.append((r["time"], step))
        elif event in ("checkpoint", "checkpoint_failed") and _num(r.get("started")):
            marks.append((r["started"], step))
            if _num(r.get("save_s")):
                overheads.append((r["started"], r["started"] + r["save_s"], "checkpoint"))
        elif event == "eval":
            begin = r["time"] - (r["eval_s"] if _num(r.get("eval_s")) else 0.0)
            marks.append((begin, step))
            overheads.append((begin, r["time"], "eval"))
    marks = sorted((min(max(t, t_begin), end), s) for t, s in marks)
    top, out = marks[0][1], []
    for t, s in marks:                     # a step never goes back within an attempt
        top = max(top, s)
        out.append((t, top))
    return out, sorted(overheads)


def _steps(tl: _Timeline, t1: float, s0: int, n: int, keep: float, acc: AttemptAccount, warm: bool = False) -> None:
    """Steps ``s0+1 .. s0+n`` ended by ``t1``: kept ones first, then lost ones; ``n == 0``: other."""
    if n <= 0:
        tl.fill(t1, [(0.0, "other")])
        return
    near = tl.near(tl.cursor, t1)
    free = _free_time(tl.cursor, t1, near) if near else max(0.0, t1 - tl.cursor)
    kept = int(max(0, min(n, keep - s0)))
    acc.kept_steps += kept
    acc.lost_steps += n - kept
    acc.step_s.append((free / n, n, warm))
    if not near and kept == n:             # the common case, kept short: a job has many steps
        tl.to(t1, GOODPUT)
        return
    tl.fill(t1, [(free * kept / n, GOODPUT), (0.0, "lost")] if kept < n else [(free, GOODPUT)])


def _tail(tl: _Timeline, a: AttemptFacts, last: tuple[float, int], end_rec: dict | None, alive: float, end: float,
          keep: float, running: bool, acc: AttemptAccount) -> None:
    """After the last mark: unlogged steps, the final or stop save, a dying step; then the final check."""
    t_last, s_last = last
    median = acc.step_health()["median_s"] or 0.0
    state = (end_rec or {}).get("state")
    if running:
        stop = end
        tl.fill(stop, [(0.0, GOODPUT if s_last < keep else "lost")])
    elif state in (COMPLETED, STOPPED):
        stop = min(max(end_rec["time"], t_last), end)
        n = max(0, int(end_rec.get("step") or 0) - s_last)
        if n:
            steps_s = min(n * median, _free_time(t_last, stop, tl.near(t_last, stop)))
            kept = int(max(0, min(n, keep - s_last)))
            acc.kept_steps, acc.lost_steps = acc.kept_steps + kept, acc.lost_steps + n - kept
            acc.step_s.append((steps_s / n, n, False))
            budget = [(steps_s * kept / n, GOODPUT), (steps_s * (n - kept) / n, "lost"), (0.0, "checkpoint")]
        else:
            budget = [(0.0, "checkpoint")]
        tl.fill(stop, budget)
    else:                                  # died (kill -9, lost node) or failed: the step in progress is lost
        stop = min(max(end_rec["time"] if end_rec else alive, t_last), end)
        tl.fill(stop, [(median if median else stop - t_last, "lost"), (0.0, "waiting")])
    check = a.final_check or {}
    if _num(check.get("started")) and _num(check.get("ended")):
        tl.to(min(max(check["started"], tl.cursor), end), "other" if state == COMPLETED else "waiting")
        tl.to(min(check["ended"], end), "final_check")
    tl.to(end, "other" if state == COMPLETED or running else "waiting")


def _free_time(t0: float, t1: float, overheads) -> float:
    busy, cursor = 0.0, t0
    for o0, o1, _ in overheads:
        lo, hi = max(o0, cursor), min(o1, t1)
        if hi > lo:
            busy += hi - lo
            cursor = hi
    return max(0.0, t1 - t0 - busy)

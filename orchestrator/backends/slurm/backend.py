"""SLURM backend: every attempt is one SLURM job, submitted through submitit.

``start`` submits :func:`~orchestrator.backends.slurm.node.run_node` with one task per node
(``sbatch --parsable``, ``--no-requeue``, ``--signal=USR2@90`` by default) and returns at
once. ``poll`` follows the job through batched ``squeue`` calls (``sacct`` for jobs squeue
has forgotten) with backoff, and when the job has ended merges the nodes' records into the
attempt directory (``agent.json`` with the SLURM state's verdict, ``status.json``,
``error-rank<R>.json``), so that the supervisor classifies a SLURM attempt exactly like a
local one. ``kill`` is ``scancel`` plus a check that the job left the queue; ``signal`` is
``scancel --signal``. SLURM never requeues an attempt by itself: after a preemption or a
time-limit signal the ranks save a checkpoint and stop, and the supervisor submits the next
attempt from the newest verified checkpoint, within its budget.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ...plan import slurm as slurm_plan
from ...states import Failure, JobState
from ...worker import channel
from ..base import AttemptHandle
from .states import JobInfo, lookup, parse_sacct, parse_squeue, sacct_argv, squeue_argv
from .submit import TRANSIENT_SUBMIT, Runner, run_command, submit

CANCEL_WAIT_S = 60.0        # after scancel: SLURM's KillWait (30 s by default) plus slack
LOST_AFTER_S = 60.0         # a job neither squeue nor sacct knows for this long is gone
SUBMIT_EXIT = 2             # exit status of an attempt whose submission was refused


class SlurmQueue:
    """State of every job this backend follows: one batched squeue call (sacct for what squeue
    forgot) per refresh; the interval grows from ``min_s`` to ``max_s`` while nothing changes."""

    FORCE_MIN_S = 0.5

    def __init__(self, runner: Runner = run_command, clock: Callable[[], float] = time.monotonic,
                 min_s: float = 1.0, max_s: float = 5.0):
        self.runner, self.clock, self.min_s, self.max_s = runner, clock, min_s, max_s
        self.interval = min_s
        self._next = self._last = float("-inf")
        self._watched: set[str] = set()
        self.known: dict[str, JobInfo] = {}
        self.first_seen: dict[str, float] = {}
        self.reachable = True          # did squeue answer at the last refresh

    def watch(self, job_id: str) -> None:
        """Follow ``job_id`` from now on (until SLURM reports it ended)."""
        ended = job_id in self.known and not self.known[job_id].active
        if job_id not in self._watched and not ended:
            self._watched.add(job_id)
            self.first_seen.setdefault(job_id, self.clock())
            self._next = float("-inf")

    def info(self, job_id: str, force: bool = False) -> JobInfo | None:
        """The latest known state of ``job_id`` (``None``: SLURM does not know it).

        ``force`` asks SLURM now (at most every ``FORCE_MIN_S``), e.g. once the nodes reported the end.
        """
        self.watch(job_id)
        now = self.clock()
        if now >= self._next or (force and now - self._last >= self.FORCE_MIN_S):
            self.refresh()
        return self.known.get(job_id)

    def refresh(self) -> None:
        """Ask SLURM about every followed job: one squeue call, one sacct call for what squeue forgot."""
        ids = sorted(self._watched)
        rc, out, err = self.runner(squeue_argv(ids))
        found = parse_squeue(out) if rc == 0 else {}
        # "Invalid job id" (all of them purged) is an answer; anything else means the controller did not answer.
        self.reachable = rc == 0 or "invalid job id" in err.lower()
        missing = [i for i in ids if i not in found]
        if missing:
            rc, out, _ = self.runner(sacct_argv(missing))
            found.update(parse_sacct(out) if rc == 0 else {})
        changed = any(self.known.get(i) is None or self.known[i].state != found[i].state for i in found)
        self.known.update(found)
        for i in ids:  # stop asking about jobs that ended
            if i in self.known and not self.known[i].active:
                self._watched.discard(i)
        self.interval = self.min_s if changed else min(self.interval * 1.5, self.max_s)
        self._last = self.clock()
        self._next = self._last + self.interval


class SlurmBackend:
    """The :class:`~orchestrator.backends.base.Backend` for SLURM (see the module docstring)."""

    name = "slurm"

    def __init__(self, runner: Runner = run_command, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, submit_fn=submit):
        self.runner, self.clock, self.sleep, self.submit_fn = runner, clock, sleep, submit_fn
        self.queue = SlurmQueue(runner, clock)
        self._nnodes: dict[str, int] = {}

    def start(self, plan, attempt: int, resume_from: str | None) -> AttemptHandle:
        """Submit the attempt; a refused submission ends it at once with a clear record."""
        adir = plan.paths.attempt_dir(attempt)
        adir.mkdir(parents=True, exist_ok=False)
        self._cancel_leftovers(plan, attempt)
        try:
            job = self.submit_fn(plan, attempt, resume_from)
        except RuntimeError as exc:
            record_submit_failure(adir, str(exc))
            return AttemptHandle(job_id=plan.job_id, attempt=attempt, pid=0, attempt_dir=str(adir))
        channel.write_json_atomic(adir / slurm_plan.JOB_RECORD, {"job_id": job, "nnodes": plan.nnodes,
                                                                 "submitted": time.time()})
        self._nnodes[job] = plan.nnodes
        self.queue.watch(job)
        return AttemptHandle(job_id=plan.job_id, attempt=attempt, pid=0, attempt_dir=str(adir), external_id=job)

    def poll(self, handle: AttemptHandle) -> int | None:
        """``None`` while the job is queued or running; once it ended, merge its records, return its status."""
        adir = Path(handle.attempt_dir)
        job = self._slurm_job(handle)
        if job is None:
            agent = channel.read_json(adir / channel.AGENT_RECORD_FILE)
            return int(agent.get("exit_code", SUBMIT_EXIT)) if agent else -9  # never submitted / record lost
        nnodes = self._nnodes.get(job) or int((channel.read_json(adir / slurm_plan.JOB_RECORD) or {}).get("nnodes", 1))
        ended = nodes_ended(adir, nnodes)
        info = self.queue.info(job, force=ended)
        if info is not None and info.active:
            return None
        if info is None and not ended and (not self.queue.reachable or
                                           self.clock() - self.queue.first_seen.get(job, 0.0) < LOST_AFTER_S):
            return None  # not visible yet, or the controller does not answer: wait, never guess
        return publish(adir, nnodes, info)

    def signal(self, handle: AttemptHandle, signame: str) -> None:
        """``scancel --signal``: to every process of every step (not the batch shell, which would die of it)."""
        job = self._slurm_job(handle)
        if job is not None:
            self.runner(["scancel", "--signal=" + signame.upper().removeprefix("SIG"), job])

    def kill(self, handle: AttemptHandle, grace_s: float = 10.0) -> list[int]:
        """``scancel`` and wait until the job left the queue; return its id if it is still there."""
        job = self._slurm_job(handle)
        if job is None:
            return []
        info = self.queue.info(job, force=True)
        if info is not None and not info.active:
            return []
        self.runner(["scancel", job])
        if self._wait_gone(job, grace_s + CANCEL_WAIT_S):
            return []
        self.runner(["scancel", "--signal=KILL", "--full", job])
        return [] if self._wait_gone(job, 15.0) else [int(job.split("_")[0])]

    def queued(self, handle: AttemptHandle) -> bool:
        """True while the attempt waits in the queue: time a watchdog should not count as start-up."""
        job = self._slurm_job(handle)
        info = self.queue.info(job) if job else None
        return bool(info and info.active and info.row.job_state in (JobState.PENDING, JobState.RESUMING))

    def reattach(self, handle: AttemptHandle) -> bool:
        """True if the attempt's job is still queued or running (found through ``slurm.json``)."""
        job = self._slurm_job(handle)
        info = self.queue.info(job, force=True) if job else None
        return bool(info and info.active)

    def find(self, plan, attempt: int) -> AttemptHandle | None:
        """The attempt's SLURM job, from the record written right after submission."""
        adir = plan.paths.attempt_dir(attempt)
        rec = channel.read_json(adir / slurm_plan.JOB_RECORD) or {}
        if rec.get("job_id"):
            return AttemptHandle(job_id=plan.job_id, attempt=attempt, pid=0, attempt_dir=str(adir),
                                 external_id=str(rec["job_id"]))
        agent = adir / channel.AGENT_RECORD_FILE
        return AttemptHandle(job_id=plan.job_id, attempt=attempt, pid=0, attempt_dir=str(adir)) if agent.is_file() \
            else None

    # -- helpers -------------------------------------------------------------------------
    def _slurm_job(self, handle: AttemptHandle) -> str | None:
        if handle.external_id:
            return handle.external_id
        rec = channel.read_json(Path(handle.attempt_dir) / slurm_plan.JOB_RECORD) or {}
        return str(rec["job_id"]) if rec.get("job_id") else None

    def _wait_gone(self, job: str, timeout_s: float) -> bool:
        end = self.clock() + timeout_s
        while True:
            info = self.queue.info(job, force=True)
            if info is None or not info.active:
                return True
            if self.clock() >= end:
                return False
            self.sleep(0.5)

    def _cancel_leftovers(self, plan, attempt: int) -> None:
        """An earlier attempt's job still queued (its supervisor was lost) must not run beside this one."""
        for n in range(1, attempt):
            handle = AttemptHandle(plan.job_id, n, 0, str(plan.paths.attempt_dir(n)))
            rec = channel.read_json(Path(handle.attempt_dir) / slurm_plan.JOB_RECORD) or {}
            if rec.get("job_id") and not rec.get("state") and self.reattach(handle):
                self.kill(handle)


def nodes_ended(adir: Path, nnodes: int) -> bool:
    """Every node's launcher wrote its final record (the job is about to leave the queue)."""
    recs = [channel.read_json(p) for p in (adir / slurm_plan.NODES_DIR).glob(f"*/{slurm_plan.NODE_RECORD}")]
    return sum(1 for r in recs if r and "ended" in r) >= nnodes


def record_submit_failure(adir: Path, message: str) -> None:
    """A refused submission ends the attempt at once: a user error, unless SLURM was only busy."""
    transient = any(t in message.lower() for t in TRANSIENT_SUBMIT)
    verdict = Failure.WORKER_LOST if transient else Failure.USER_ERROR
    channel.write_json_atomic(adir / channel.error_file_name(0), {
        "rank": "sbatch", "type": "SlurmSubmitError", "message": message, "phase": "setup", "step": 0,
        "time": time.time()})
    channel.write_json_atomic(adir / channel.AGENT_RECORD_FILE, {
        "outcome": "submit_failed", "exit_code": SUBMIT_EXIT, "failures": {}, "scheduler_failure": verdict.value,
        "slurm": {"job_id": None, "state": None, "message": message}})


def publish(adir: Path, nnodes: int, info: JobInfo | None) -> int:
    """Merge the nodes' records into the attempt directory once the job ended; return its exit status."""
    agents: dict[int, dict] = {}
    for node in range(nnodes):
        ndir = adir / slurm_plan.NODES_DIR / str(node)
        agent = channel.read_json(ndir / channel.AGENT_RECORD_FILE)
        if agent:
            agents[node] = agent
        for src in sorted(ndir.glob(f"{channel.ERROR_FILE_PREFIX}*.json")) + [ndir / channel.STATUS_FILE]:
            dst = adir / src.name
            if src.is_file() and not dst.exists():
                channel.write_json_atomic(dst, channel.read_json(src) or {})
    failures: dict = {}
    for agent in agents.values():
        failures.update(agent.get("failures") or {})
    rc = exit_status([a.get("exit_code") for a in agents.values()], nnodes - len(agents), info)
    row = lookup(info.state) if info else None
    verdict = row.verdict if row else None
    started = list((adir / slurm_plan.NODES_DIR).glob(f"*/{slurm_plan.NODE_RECORD}"))
    if info is not None and info.state == "FAILED" and not started:
        # The job failed before orchestrate's launcher ran on any node: the environment (python, setup
        # lines, a module missing on the nodes) is wrong; an identical retry would fail the same way.
        verdict = Failure.USER_ERROR
        log = adir / slurm_plan.SUBMITIT_DIR / f"{info.job_id}_0_log.err"
        tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.is_file() else []
        channel.write_json_atomic(adir / channel.error_file_name(0), {
            "rank": "slurm", "type": "SlurmJobError", "phase": "setup", "step": 0, "time": time.time(),
            "message": f"SLURM job {info.job_id} failed before any node started training; {log}: "
                       + (" | ".join(tail) or "(empty)")})
    slurm = {"job_id": info.job_id if info else None, "state": info.state if info else None,
             "raw_state": info.raw_state if info else None, "reason": info.reason if info else None,
             "exit_code": info.exit_code if info else None, "meaning": row.meaning if row else "unknown to SLURM"}
    record = {"outcome": "succeeded" if rc == 0 else "failed", "exit_code": rc, "failures": failures,
              "nodes": {str(k): v for k, v in agents.items()}, "nodes_without_record": nnodes - len(agents),
              "slurm": slurm, "scheduler_failure": verdict.value if verdict else None}
    if not (adir / channel.AGENT_RECORD_FILE).exists():
        channel.write_json_atomic(adir / channel.AGENT_RECORD_FILE, record)
    job_rec = channel.read_json(adir / slurm_plan.JOB_RECORD) or {}
    channel.write_json_atomic(adir / slurm_plan.JOB_RECORD, {**job_rec, **slurm, "ended": time.time()})
    return rc


def exit_status(codes: list, missing: int, info: JobInfo | None) -> int:
    """One exit status for the attempt: 0 if every node succeeded, 75 if they stopped gracefully,
    else the first failure (SLURM's exit code when no node left a record)."""
    codes = [c for c in codes if isinstance(c, int)]
    # A node ended by SIGTERM (128+15) was stopped because another failed: the other is the cause.
    bad = sorted((c for c in codes if c not in (0, channel.EXIT_STOPPED)), key=lambda c: c == 128 + 15)
    if bad:
        return bad[0]
    if channel.EXIT_STOPPED in codes:
        return channel.EXIT_STOPPED
    if codes and not missing:
        return 0
    if info is not None and info.exit_signal:
        return -info.exit_signal
    return info.exit_code if info is not None and info.exit_code else 1

"""Attempts as job steps of the allocation the supervisor runs in (used inside the batch step).

``start`` runs ``srun`` (:func:`orchestrator.plan.slurm.step_argv`) on the nodes the attempt
gets and returns at once; ``poll`` waits for srun, then merges the nodes' records with SLURM's
record of the step (:mod:`.records`) and counts node failures; ``kill`` and ``signal`` are
``scancel`` of the step. A new attempt after a crash is a new step in the same allocation: the
queue is not involved. :meth:`placement` decides what the next attempt can have: the nodes
of the allocation that SLURM still considers usable and that did not fail twice, or a reason
to continue in a new allocation (the time limit is near, too few nodes are left).

SLURM's ``--signal`` reaches only the steps running when it is sent, and it may be sent up to a
minute early: a step started after it (the first one, or one after a crash) would never hear it and
be killed at the time limit with its work since the last checkpoint. So :meth:`poll` also minds the
clock: once the time left is under the signal delay, it sends the running step the same signal
itself, once.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...plan import slurm as slurm_plan
from ...states import Failure
from ...worker import channel
from ..base import AttemptHandle
from ..processes import ProcessId
from . import scontrol
from .records import SUBMIT_EXIT, publish, record_submit_failure
from .states import parse_sacct_steps, sacct_step_argv
from .submit import Runner, run_command

SRUN_LOG = "srun.log"
SIGNALS_LOG = "signals.jsonl"   # signals the supervisor sent the step itself (the time limit near)
NODES_FILE = "nodes.json"      # <run_dir>/slurm/nodes.json: failures per node over the whole job
EXCLUDE_AFTER = 2              # a node that failed this often is excluded for the rest of the job
TIME_MARGIN_S = 60             # a PREEMPTED attempt with less time left than signal delay + this: requeue
END_REFRESH_S = 15.0           # how often the allocation's end time is read again (a time limit may be changed)


@dataclass(frozen=True)
class Placement:
    """Where the next attempt runs: these nodes, or (``relocate``) in a new allocation, and why."""

    nodes: tuple[str, ...] = ()
    relocate: str | None = None
    exclude: tuple[str, ...] = ()
    resize: int | None = None       # go on here with this many nodes (launch.slurm.min_nodes allows it)


def node_failures(run_dir) -> dict[str, int]:
    return {k: int(v) for k, v in (channel.read_json(Path(run_dir) / slurm_plan.SUBMITIT_DIR / NODES_FILE) or {}).items()}


def _count_failure(run_dir, nodes: list[str]) -> dict[str, int]:
    counts = node_failures(run_dir)
    for n in nodes:
        counts[n] = counts.get(n, 0) + 1
    channel.write_json_atomic(Path(run_dir) / slurm_plan.SUBMITIT_DIR / NODES_FILE, counts)
    return counts


def _keeps_batch(plan, nnodes: int) -> bool:
    from ...plan.resize import batch_of

    return batch_of(plan)[2] % (nnodes * plan.nproc_per_node) == 0


class SlurmStepBackend:
    """The :class:`~orchestrator.backends.base.Backend` of a supervisor inside SLURM job ``slurm_job``."""

    name = "slurm"

    def __init__(self, slurm_job: str, runner: Runner = run_command, python: str = sys.executable,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.job, self.runner, self.python, self.clock, self.sleep = str(slurm_job), runner, python, clock, sleep
        self._procs: dict[int, subprocess.Popen] = {}
        self.last_allocation_attempt: int | None = None   # the last attempt started in this allocation
        self._next: tuple[str, ...] = ()                   # the nodes :meth:`placement` chose last
        self.in_place = False                              # the last attempt started here followed another one
        self._deadline: tuple[str, int] = ("USR2", 90)    # the plan's stop signal and its delay before the end
        self._end: tuple[float, float | None] | None = None  # (when read, the allocation's end time)
        self._signalled: set[int] = set()                  # attempts already sent the time-limit signal

    # -- where the next attempt runs ------------------------------------------------------------
    def placement(self, plan, last_failure: Failure | None = None) -> Placement:
        """The nodes for the next attempt, or why the job must continue in a new allocation."""
        info = scontrol.allocation(self.job, self.runner)
        nodes = list(info.nodes) if info else []
        states = scontrol.node_states(nodes, self.runner)
        failures = node_failures(plan.run_dir)
        excluded = tuple(sorted(n for n, k in failures.items() if k >= EXCLUDE_AFTER))
        good = [n for n in nodes if scontrol.usable(states.get(n, "")) and n not in excluded]
        # Only a stop in this allocation says its time is running out (a requeued job starts with its last
        # attempt PREEMPTED and a fresh time limit).
        if last_failure is Failure.PREEMPTED and info is not None and self.last_allocation_attempt is not None:
            left = info.time_left_s()
            if left is not None and left < int(plan.slurm.get("signal_delay_s") or 90) + TIME_MARGIN_S:
                return Placement(relocate=f"the allocation's time limit is {max(0, left):.0f} s away",
                                 exclude=excluded)
        if slurm_plan.min_nodes(plan) <= len(good) < plan.nnodes and _keeps_batch(plan, len(good)):
            self._next = tuple(good)    # fewer nodes, same global batch (more gradient accumulation)
            return Placement(nodes=self._next, exclude=excluded, resize=len(good))
        if len(good) < plan.nnodes:
            bad = sorted((set(nodes) | set(failures)) - set(good))
            return Placement(relocate=f"{len(good)} usable node(s) left of {plan.nnodes} (lost: "
                                      f"{', '.join(bad) or 'unknown'})", exclude=tuple(sorted(set(excluded) | set(bad))))
        self._next = tuple(good[:plan.nnodes])
        return Placement(nodes=self._next, exclude=excluded)

    # -- Backend ------------------------------------------------------------------------------
    def start(self, plan, attempt: int, resume_from: str | None) -> AttemptHandle:
        adir = plan.paths.attempt_dir(attempt)
        adir.mkdir(parents=True, exist_ok=False)
        nodes, self._next = list(self._next or self.placement(plan).nodes), ()
        if len(nodes) < plan.nnodes:
            record_submit_failure(adir, f"only {len(nodes)} usable node(s) in allocation {self.job}; "
                                        f"{plan.nnodes} needed (temporarily unavailable)")
            return AttemptHandle(job_id=plan.job_id, attempt=attempt, pid=0, attempt_dir=str(adir),
                                 external_id=self.job)
        channel.write_json_atomic(slurm_plan.step_spec_path(plan, attempt),
                                  {"plan": plan.to_dict(), "attempt": attempt, "resume_from": resume_from})
        argv = slurm_plan.step_argv(plan, attempt, nodes, self.python)
        with open(adir / SRUN_LOG, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=plan.workdir, start_new_session=True)
        self._procs[attempt] = proc
        self._deadline = (str(plan.slurm.get("signal") or "USR2"), int(plan.slurm.get("signal_delay_s") or 90))
        self._end = None
        self.in_place = self.last_allocation_attempt is not None   # an attempt ran in this allocation before
        self.last_allocation_attempt = attempt
        channel.write_json_atomic(adir / slurm_plan.JOB_RECORD, {"job_id": self.job, "nodes": nodes,
                                                                 "nnodes": len(nodes), "submitted": time.time()})
        ident = ProcessId.of(proc.pid)
        return AttemptHandle(job_id=plan.job_id, attempt=attempt, pid=proc.pid, attempt_dir=str(adir),
                             external_id=self.job, pid_start=ident.start_time, host=ident.host)

    def poll(self, handle: AttemptHandle) -> int | None:
        adir = Path(handle.attempt_dir)
        proc = self._procs.get(handle.attempt)
        if proc is not None and proc.poll() is None:
            self._mind_time_limit(handle)
            return None
        if proc is None and self._job_of(handle) == self.job and self._step_alive(handle.attempt):
            return None
        record = channel.read_json(adir / slurm_plan.JOB_RECORD) or {}
        if not record.get("nodes"):   # never launched
            agent = channel.read_json(adir / channel.AGENT_RECORD_FILE)
            return int(agent.get("exit_code", SUBMIT_EXIT)) if agent else -signal.SIGKILL
        step = self._step_id(adir)
        info = self._step_info(record.get("job_id") or self.job, step)
        rc = publish(adir, int(record.get("nnodes") or len(record["nodes"])), info, adir / SRUN_LOG)
        channel.write_json_atomic(adir / slurm_plan.JOB_RECORD, {**(channel.read_json(adir / slurm_plan.JOB_RECORD) or {}),
                                                                 "step_id": step})
        if rc != 0:   # (a node lost mid-step may leave the others stopped gracefully: 75)
            self._note_lost_nodes(adir, record["nodes"])
        return rc

    def signal(self, handle: AttemptHandle, signame: str) -> None:
        step = self._step_id(Path(handle.attempt_dir))
        if step is not None:
            self.runner(["scancel", "--signal=" + signame.upper().removeprefix("SIG"),
                         f"{self._job_of(handle)}.{step}"])

    def kill(self, handle: AttemptHandle, grace_s: float = 10.0) -> list[int]:
        """``scancel`` of the step (or srun itself, before the step exists); wait for srun to end.

        The step is named by the SLURM job the attempt ran in (its own record), which after a relocation
        is not this allocation: ``<this job>.<step>`` would be another attempt's step, or nothing."""
        step = self._step_id(Path(handle.attempt_dir))
        proc = self._procs.get(handle.attempt)
        if step is not None:
            self.runner(["scancel", f"{self._job_of(handle)}.{step}"])
        elif proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)   # srun passes it to the tasks, then cancels the step
        if proc is None:
            return []
        try:
            proc.wait(timeout=grace_s + 60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        return [] if proc.poll() is not None else [proc.pid]

    def reattach(self, handle: AttemptHandle) -> bool:
        return False   # a step belongs to the supervisor (the batch step) that started it

    def find(self, plan, attempt: int) -> AttemptHandle | None:
        adir = plan.paths.attempt_dir(attempt)
        if not adir.is_dir():
            return None
        record = channel.read_json(adir / slurm_plan.JOB_RECORD) or {}
        return AttemptHandle(job_id=plan.job_id, attempt=attempt, pid=0, attempt_dir=str(adir),
                             external_id=str(record.get("job_id") or self.job))

    def attempt_facts(self, handle: AttemptHandle) -> dict:
        """What the ledger records about where the attempt runs."""
        record = channel.read_json(Path(handle.attempt_dir) / slurm_plan.JOB_RECORD) or {}
        job = record.get("job_id") or self.job
        step = self._step_id(Path(handle.attempt_dir))
        return {"scheduler_job_id": job, "nodes": ",".join(record.get("nodes") or []),
                "external_id": f"{job}.{step}" if step is not None else job, "in_place": int(self.in_place)}

    def relocate(self, plan, where: Placement) -> tuple[str, str | None]:
        """Continue the job in a new allocation: ``scontrol requeue`` of this one (the same SLURM job id), or a new
        submission from here when nodes must be excluded (a running job's node list cannot be changed, and a
        requeued one's batch step, this process, is ended before it could) or SLURM refuses the requeue.
        Returns ``(what happened, the new SLURM job id or None)``."""
        why = "nodes to exclude"
        if not where.exclude:
            rc, _, err = self.runner(["scontrol", "requeue", self.job])
            if rc == 0:
                return f"requeued as SLURM job {self.job} ({where.relocate})", None
            why = f"SLURM refused the requeue: {err.strip() or rc}"
        from .allocation import note_allocation
        from .submit import submit_allocation

        new = submit_allocation(plan, os.environ.get("ORCHESTRATE_HOME", ""), exclude=where.exclude)
        note_allocation(plan.run_dir, "resubmitted", new, previous=self.job, exclude=list(where.exclude))
        return (f"submitted a new allocation, SLURM job {new}, from inside SLURM job {self.job} ({why}; "
                f"{where.relocate})", new)

    # -- helpers ------------------------------------------------------------------------------
    def _job_of(self, handle: AttemptHandle) -> str:
        """The SLURM job the attempt ran in: its own record (``slurm.json``), else its handle, else this one."""
        record = channel.read_json(Path(handle.attempt_dir) / slurm_plan.JOB_RECORD) or {}
        external = (handle.external_id or "").split(".", 1)[0]
        return str(record.get("job_id") or external or self.job)

    def _mind_time_limit(self, handle: AttemptHandle) -> None:
        """Send the running step the time-limit signal if SLURM's has not reached it and time is short."""
        if handle.attempt in self._signalled:
            return
        now = self.clock()
        if self._end is None or now - self._end[0] >= END_REFRESH_S:
            info = scontrol.allocation(self.job, self.runner)
            self._end = (now, info.end_time if info else None)
        sig, delay = self._deadline
        left = None if self._end[1] is None else self._end[1] - time.time()
        if left is None or left >= delay or self._step_id(Path(handle.attempt_dir)) is None:
            return
        self._signalled.add(handle.attempt)
        self.signal(handle, sig)
        channel.append_jsonl(Path(handle.attempt_dir) / SIGNALS_LOG,
                             {"time": time.time(), "signal": sig, "time_left_s": round(left, 1), "by": "supervisor"})

    def _step_id(self, adir: Path) -> str | None:
        for path in sorted((adir / slurm_plan.NODES_DIR).glob(f"*/{slurm_plan.NODE_RECORD}")):
            step = (channel.read_json(path) or {}).get("slurm_step_id")
            if step is not None:
                return str(step)
        return (channel.read_json(adir / slurm_plan.JOB_RECORD) or {}).get("step_id")

    def _step_alive(self, attempt: int) -> bool:
        rc, out, _ = self.runner(["squeue", "--noheader", "--steps", f"--jobs={self.job}", "--format=%i|%j"])
        return rc == 0 and any(line.endswith(f"-a{attempt}") for line in out.splitlines())

    def _step_info(self, job: str, step: str | None):
        if step is None:
            return None
        sid = f"{job}.{step}"
        for _ in range(10):   # sacct lags the controller by a second or so
            rc, out, _ = self.runner(sacct_step_argv([sid]))
            info = parse_sacct_steps(out).get(sid) if rc == 0 else None
            if info is not None and not info.active:
                return info
            self.sleep(0.5)
        return None

    def _note_lost_nodes(self, adir: Path, nodes: list[str]) -> None:
        """Count a failure for each node of the step SLURM no longer considers usable or took from the allocation."""
        states = scontrol.node_states(nodes, self.runner)
        info = scontrol.allocation(self.job, self.runner)
        lost = [n for n in nodes if not scontrol.usable(states.get(n, "")) or (info and n not in info.nodes)]
        if lost:
            _count_failure(adir.parent.parent, lost)

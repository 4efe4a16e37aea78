"""A job's SLURM allocation: submitted from the login node, supervised from inside.

``python -m orchestrator.supervise.in_allocation`` is what the allocation's batch step runs
(submitit, without srun, on the first node): it takes the job's lease and runs the same supervisor loop as locally, with each
attempt a job step of the allocation (:class:`.steps.SlurmStepBackend`). The login node only
submits (:func:`submit`), follows the job's files and reads: killing every process of the
user there stops nothing. When the allocation is requeued (time limit, preemption, lost
nodes) the same command runs again in the new allocation, under the same SLURM job id, and
adopts the job with its history and budget.

Login-side helpers: :func:`allocation_state` (what SLURM says of the job's allocation) and
:func:`cancel_allocation` (``scancel``, then wait until it left the queue).
"""
from __future__ import annotations

import time
from pathlib import Path

from ...plan import slurm as slurm_plan
from ...states import JobState
from ...worker import channel
from .queue import SlurmQueue
from .states import JobInfo, parse_sacct, sacct_argv
from .submit import Runner, run_command, submit_allocation

ALLOCATIONS = "allocations.jsonl"   # <run_dir>/slurm/allocations.jsonl: one record per allocation event


def note_allocation(run_dir, event: str, slurm_job: str, **fields) -> None:
    """Append to the job's allocation history (submitted, started, requeued, resubmitted)."""
    channel.append_jsonl(Path(run_dir) / slurm_plan.SUBMITIT_DIR / ALLOCATIONS,
                         {"event": event, "job_id": str(slurm_job), "time": time.time(), **fields})


def submit(plan, home, exclude: tuple[str, ...] = ()) -> str:
    """Submit the job's allocation and record it; the SLURM job id."""
    slurm_job = submit_allocation(plan, str(home), exclude)
    note_allocation(plan.run_dir, "submitted", slurm_job, exclude=list(exclude))
    return slurm_job


def allocation_state(slurm_job: str | None, runner: Runner = run_command) -> JobInfo | None:
    """What SLURM says of an allocation now (``None``: unknown to SLURM)."""
    if not slurm_job:
        return None
    return SlurmQueue(runner).info(str(slurm_job), force=True)


def allocation_states(slurm_jobs: list[str], runner: Runner = run_command) -> dict[str, JobInfo]:
    """What SLURM says of several allocations: one squeue call (and one sacct call for those it forgot)."""
    queue = SlurmQueue(runner)
    for job in slurm_jobs:
        queue.watch(str(job))
    queue.refresh()
    return {str(j): queue.known[str(j)] for j in slurm_jobs if str(j) in queue.known}


def accounted_state(slurm_job: str, runner: Runner = run_command, wait_s: float = 3.0,
                    sleep=time.sleep) -> JobInfo | None:
    """The allocation's base state as SLURM's accounting (``sacct``) records it, once it left RUNNING.

    squeue's ``%T`` (and scontrol) say COMPLETING while a cancelled job's processes end; sacct says
    ``CANCELLED by <uid>`` at once (slurmdbd may lag a second, hence the short wait, well inside
    KillWait). ``None``: still running as far as accounting knows, or unknown.
    """
    end = time.monotonic() + wait_s
    while True:
        rc, out, _ = runner(sacct_argv([str(slurm_job)]))
        info = parse_sacct(out).get(str(slurm_job)) if rc == 0 else None
        if info is not None and info.state not in ("RUNNING", "COMPLETING", "CONFIGURING"):
            return info
        if time.monotonic() >= end:
            return None
        sleep(0.5)


def cancel_allocation(slurm_job: str | None, runner: Runner = run_command, wait_s: float = 90.0) -> bool:
    """``scancel`` the allocation and wait until it left the queue; True if it did."""
    if not slurm_job:
        return True
    info = allocation_state(slurm_job, runner)
    if info is None or not info.active:
        return True
    runner(["scancel", str(slurm_job)])
    queue = SlurmQueue(runner)
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        info = queue.info(str(slurm_job), force=True)
        if info is None or not info.active:
            return True
        time.sleep(0.5)
    return False


def ending_state(slurm_job: str, runner: Runner = run_command):
    """Asked when the batch step gets SIGTERM: a user's scancel ends the job CANCELLED (read from sacct's
    base state: squeue still says COMPLETING then); otherwise (a preemption that requeues it, the time
    limit) it goes on in a new allocation."""
    def decide() -> JobState | None:
        info = accounted_state(slurm_job, runner)
        return JobState.CANCELLED if info is not None and info.state == "CANCELLED" else None
    return decide

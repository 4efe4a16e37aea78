"""A SLURM job seen from the login node: submit its allocation, follow it, resume it, cancel it.

The supervisor of a SLURM job runs inside the job's allocation
(:mod:`orchestrator.supervise.in_allocation`); the login node only submits, follows the job's
files and reads. Killing every process of the user there stops nothing.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Callable

from ..backends.slurm import allocation
from ..backends.slurm.steps import EXCLUDE_AFTER, node_failures
from ..errors import JobError
from ..states import JobState
from ..store import requests
from ..store.lease import LeaseBusy, hold, judge_holder, lease_duration
from ..store.ledger import Job, Ledger
from ..store.paths import orchestrate_home
from .jobs import load_plan, replace_plan

RESUME = "resume"   # request: a finished (failed/cancelled) job runs again in its next allocation
FOLLOW_POLL_S = 0.5
RECONCILE_S = 5.0     # how often a follower asks SLURM whether an unsupervised allocation ended


def submit(ledger: Ledger, job: Job) -> str:
    """Submit the job's first allocation; the SLURM job id (the job is FAILED if SLURM refuses it)."""
    plan = load_plan(job)
    try:
        slurm_job = allocation.submit(plan, orchestrate_home())
    except RuntimeError as exc:
        ledger.update_job(job.id, state=JobState.FAILED, message=f"SLURM refused the job: {exc}")
        raise JobError(f"{job.id}: SLURM refused the job: {exc}") from exc
    ledger.update_job(job.id, scheduler_job_id=slurm_job,
                      message=f"waiting for its allocation (SLURM job {slurm_job}); supervised inside it")
    return slurm_job


def resume(ledger: Ledger, job: Job, plan=None) -> str:
    """Give the job an allocation again (unless it has one, queued or running); a line saying what happened.

    ``plan``: the job's plan from now on (``orchestrate resume --nodes``), written under the lease.
    """
    info = allocation.allocation_state(job.scheduler_job_id)
    if info is not None and info.active:
        return f"{job.id} is already in SLURM job {info.job_id} ({info.state}); nothing to do"
    try:   # two resumes at once: one submits; a dead holder's lease is judged on this host's clock
        lease = hold(job.run_dir, wait_s=lease_duration() + 2)
    except LeaseBusy as busy:
        return f"{job.id} is already supervised by {busy.holder.describe()}; nothing to do"
    with lease:
        try:
            requests.clear(job.run_dir, requests.CANCEL, older_than=lease.record.acquired)
            if job.state.is_terminal:
                requests.make_request(job.run_dir, RESUME)
            if plan is not None:
                replace_plan(job, plan, max((a.n for a in job.attempts), default=0), fence=lease.check)
            plan = load_plan(job)
            exclude = tuple(sorted(n for n, k in node_failures(plan.run_dir).items() if k >= EXCLUDE_AFTER))
            lease.check()
            slurm_job = allocation.submit(plan, orchestrate_home(), exclude)
            ledger.update_job(job.id, fence=lease.gen, scheduler_job_id=slurm_job,
                              message=f"resumed: waiting for its allocation (SLURM job {slurm_job})")
        except RuntimeError as exc:
            raise JobError(f"{job.id}: SLURM refused the job: {exc}") from exc
    return f"{job.id}: submitted as SLURM job {slurm_job}"


def cancel_unsupervised(job: Job) -> bool:
    """Nobody supervises the job (its allocation waits in the queue, or is gone): ``scancel`` it."""
    return allocation.cancel_allocation(job.scheduler_job_id)


def reconcile(ledger: Ledger, job: Job, info=None) -> str | None:
    """A SLURM job whose allocation ended while nobody supervised it (the batch step failed before its
    supervisor started, or the supervisor was killed with it): record how it ended. Returns what was
    recorded, or ``None`` when there is nothing to do (it is queued, running, or supervised).

    ``info``: what SLURM said of the allocation (:func:`reconcile_all` asks once for every job).
    """
    if job.backend != "slurm" or job.state.is_terminal or not job.scheduler_job_id:
        return None
    holder, alive = judge_holder(job.run_dir)
    if holder is not None and alive is not False:
        return None
    info = info if info is not None else allocation.allocation_state(job.scheduler_job_id)
    if info is None or info.active:
        return None   # queued, running, or not known to SLURM (yet): nothing to conclude
    try:
        lease = hold(job.run_dir)
    except LeaseBusy:
        return None
    with lease:
        log = Path(job.run_dir) / "slurm" / f"{job.scheduler_job_id}_0_log.err"
        tail = log.read_text(errors="replace").strip().splitlines()[-4:] if log.is_file() else []
        state = JobState.CANCELLED if info.state == "CANCELLED" else JobState.FAILED
        message = (f"SLURM job {job.scheduler_job_id} ended {info.raw_state or info.state} with no supervisor in it"
                   + (f"; {log}: " + " | ".join(tail) if tail else "") + f"; orchestrate resume {job.id} runs it again")
        for a in job.attempts:
            if a.is_open:
                ledger.update_attempt(job.id, a.n, fence=lease.gen, ended=time.time(), gained_checkpoint=0,
                                      failure="CANCELLED" if state is JobState.CANCELLED else "WORKER_LOST")
        ledger.update_job(job.id, fence=lease.gen, state=state, message=message)
        return message


def reconcile_all(ledger: Ledger, jobs: list[Job]) -> dict[str, str]:
    """:func:`reconcile` every unfinished SLURM job nobody supervises, with one batched squeue (and sacct) call
    for all of them; ``{job id: what was recorded}``."""
    todo = [j for j in jobs if j.backend == "slurm" and not j.state.is_terminal and j.scheduler_job_id
            and judge_holder(j.run_dir)[1] is False]
    if not todo:
        return {}
    infos = allocation.allocation_states([j.scheduler_job_id for j in todo])
    said = {}
    for job in todo:
        info = infos.get(str(job.scheduler_job_id))
        message = reconcile(ledger, job, info) if info is not None else None
        if message:
            said[job.id] = message
    return said


def follow(ledger: Ledger, job: Job, on_event: Callable[[str], None], cancel: Callable[[], None]) -> JobState:
    """Wait, showing events, until the job ends; Ctrl-C cancels it (saying so), a closed terminal only leaves."""
    interrupted = []

    def on_int(signum, frame):
        interrupted.append(True)

    old = signal.signal(signal.SIGINT, on_int)
    signal.signal(signal.SIGHUP, lambda s, f: (_ for _ in ()).throw(SystemExit(0)))
    last, next_check = None, time.monotonic() + RECONCILE_S
    try:
        while True:
            current = ledger.get(job.id)
            if current.message != last and current.message:
                on_event(current.message)
                last = current.message
            if current.state.is_terminal and _no_live_lease(current):
                return current.state
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + RECONCILE_S
                reconcile(ledger, current)
            if interrupted:
                on_event(f"Ctrl-C: cancelling job {job.id} (its supervisor in the allocation ends it) ...")
                interrupted.clear()
                cancel()
            time.sleep(FOLLOW_POLL_S)
    finally:
        signal.signal(signal.SIGINT, old)


def _no_live_lease(job: Job) -> bool:
    return judge_holder(job.run_dir)[1] is False

"""The supervisor inside a SLURM allocation: ``python -m orchestrator.supervise.in_allocation HOME JOB``.

What the batch step of a job's allocation runs (submitted by :mod:`orchestrator.backends.slurm.allocation`):
it takes the job's lease and runs the same supervisor loop as locally; every attempt is a job step
of this allocation (:class:`~orchestrator.backends.slurm.steps.SlurmStepBackend`), so a crash is
followed by a new step within seconds, not by a trip through the queue. When the allocation is
requeued (the time limit is near, nodes were lost) this runs again in the new allocation, under the
same SLURM job id, and adopts the job with its history and retry budget (waiting for the lease of the
previous allocation's batch step to expire if that step died holding it). SIGTERM (the allocation is
ending): a user's ``scancel`` ends the job CANCELLED; anything else leaves it to the next allocation.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path


def run_allocation(home: str, job_id: str) -> str:
    """Supervise ``job_id`` in this allocation until it ends or moves on; a word on how it left."""
    from ..backends.slurm.allocation import ending_state, note_allocation
    from ..backends.slurm.steps import SlurmStepBackend
    from ..store import requests
    from ..store.jobs import open_ledger
    from ..store.lease import LeaseBusy
    from .control import take_job
    from .jobs import load_plan
    from .remote import RESUME
    from .supervisor import Supervisor

    def say(message: str) -> None:
        print(time.strftime("%Y-%m-%d %H:%M:%S"), message, flush=True)

    os.environ["ORCHESTRATE_HOME"] = home
    slurm_job = os.environ.get("SLURM_JOB_ID", "")
    ledger = open_ledger(Path(home))
    job = ledger.get(job_id)
    note_allocation(job.run_dir, "started", slurm_job, host=socket.gethostname(),
                    nodelist=os.environ.get("SLURM_JOB_NODELIST"), restarts=os.environ.get("SLURM_RESTART_COUNT"))
    rerun = requests.pending(job.run_dir, RESUME) is not None   # `orchestrate resume` of a finished job
    if job.state.is_terminal and not rerun:
        say(f"{job_id} is {job.state.value}: nothing to do in this allocation")
        return job.state.value
    try:
        lease = take_job(job)
    except LeaseBusy as busy:
        lease = _after_previous_holder(job, busy.holder, slurm_job, say)
        if lease is None:
            return "busy"
    requests.clear(job.run_dir, RESUME)
    say(f"supervising {job_id} in SLURM job {slurm_job} on {socket.gethostname()} (lease generation {lease.gen})")
    ledger.update_job(job_id, fence=lease.gen, scheduler_job_id=slurm_job)
    sup = Supervisor(load_plan(job), ledger, SlurmStepBackend(slurm_job), lease, on_event=say)
    decide = ending_state(slurm_job)
    signal.signal(signal.SIGTERM, lambda s, f: sup.request_stop("the allocation is ending", decide))
    signal.signal(signal.SIGINT, lambda s, f: sup.request_stop("interrupted", decide))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        state = sup.run(adopt=True, fresh_budget=job.state.is_terminal)
    finally:
        lease.release()
    say(f"{job_id}: {state.value if state else 'left to the next allocation or another supervisor'}")
    return state.value if state else "moved"


def _after_previous_holder(job, holder, slurm_job: str, say):
    """The lease is still held when this allocation starts: by the dead batch step of the allocation
    this one replaces (a requeue keeps the SLURM job id; a node lost with it cannot release), or by a
    supervisor that really runs. Wait (the lease's duration and a margin, judged on this host's clock)
    for a holder whose allocation no longer runs, then take the job; leave it to one that does."""
    from ..backends.slurm.allocation import allocation_state
    from ..store.lease import LeaseBusy, lease_duration
    from .control import WATCH_MARGIN_S, take_job

    where = holder.owner.where.removeprefix("slurm:") if holder.owner.where.startswith("slurm:") else ""
    if where and where != slurm_job:
        info = allocation_state(where)
        if info is not None and info.active:
            say(f"{job.id} is supervised by {holder.describe()} in SLURM job {where}, which still runs; this "
                f"allocation leaves it alone")
            return None
    wait = holder.duration_s + WATCH_MARGIN_S + lease_duration() / 4
    say(f"{job.id}: its lease is still held by {holder.describe()}" + (f" (SLURM job {where})" if where else "")
        + f"; waiting up to {wait:.0f} s for it to expire")
    try:
        return take_job(job, wait_s=wait)
    except LeaseBusy as busy:
        say(f"{job.id} is supervised by {busy.holder.describe()} (its lease is being renewed); this allocation "
            f"leaves it alone")
        return None


def main(argv: list[str] | None = None) -> int:
    from ..store.private import NotPrivate, private_umask

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m orchestrator.supervise.in_allocation HOME JOB", file=sys.stderr)
        return 2
    private_umask()
    try:
        run_allocation(argv[0], argv[1])
    except NotPrivate as exc:
        print(f"orchestrate: refusing to supervise: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

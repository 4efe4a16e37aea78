"""A sweep's jobs, created and handed to their supervisors as one group (issue 19).

Locally every job gets a background supervisor at once, which waits QUEUED for its slot
(:mod:`.queue`): the queue runs with nobody watching and survives the submitting terminal. On
SLURM each job is its own allocation, submitted at once; the scheduler's queue does the waiting.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..backends.processes import pid_alive, spawn_supervisor
from ..config import JobConfig
from ..errors import JobError
from ..plan import LaunchPlan
from ..states import JobState
from ..store import groups, requests
from ..store.ledger import Job, Ledger
from .control import TAKEOVER_WAIT_S, cancel, take_job
from .jobs import check_output_dir, create_job


def create_group(home: Path, ledger: Ledger, group: groups.Group,
                 points: list[tuple[JobConfig, LaunchPlan]]) -> list[Job]:
    """Write the group's record and each point's job (QUEUED locally); every output_dir is checked first."""
    for cfg, plan in points:
        check_output_dir(plan, cfg, ledger)
    groups.write_group(home, group)
    jobs = []
    for cfg, plan in points:
        job = create_job(cfg, plan, ledger)
        fields = {"group_id": group.id}
        if plan.backend == "local":
            fields.update(state=JobState.QUEUED, message=f"queued in group {group.id}")
        ledger.update_job(job.id, **fields)
        jobs.append(ledger.get(job.id))
    return jobs


def start_local(home: Path, jobs: list[Job]) -> None:
    """A background supervisor for each job, all started at once; returns when each holds its job."""
    handing = []
    for job in jobs:
        lease = take_job(job)   # held until its supervisor takes it over: the queue sees it supervised
        handing.append((job, lease, spawn_supervisor(job.id, home, Path(job.run_dir), handoff_token=lease.token)))
    end = time.monotonic() + TAKEOVER_WAIT_S
    failed = []
    for job, lease, pid in handing:
        while lease.superseded() is None and pid_alive(pid) and time.monotonic() < end:
            time.sleep(0.05)
        if lease.superseded() is not None:
            lease.stop()
        else:
            lease.release()
            failed.append(f"{job.id} (pid {pid}, see {Path(job.run_dir) / 'supervisor.log'})")
    if failed:
        raise JobError("the background supervisor did not take over: " + "; ".join(failed) +
                       "; orchestrate resume JOB starts one")


def submit_slurm(ledger: Ledger, jobs: list[Job]) -> list[str]:
    """One allocation per job; the SLURM job ids."""
    from . import remote

    return [remote.submit(ledger, job) for job in jobs]


def cancel_group(ledger: Ledger, group: groups.Group) -> dict[str, list[int]]:
    """Cancel every job of the group that has not ended, queued ones first (so that none starts in the
    meantime); ``{job id: PIDs left}`` of the jobs cancelled."""
    jobs = [j for j in (ledger.get(i) for i in group.job_ids) if j is not None and not j.state.is_terminal]
    for job in jobs:   # every request first: each supervisor acts on its own within a second
        requests.make_request(job.run_dir, requests.CANCEL)
    jobs.sort(key=lambda j: j.state is not JobState.QUEUED)
    return {job.id: cancel(ledger, ledger.get(job.id)) for job in jobs}

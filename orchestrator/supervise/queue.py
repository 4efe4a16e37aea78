"""The local queue of a sweep (issue 19): a job of a group waits QUEUED for a slot, then starts.

Each job of a local group has a background supervisor from the moment it is submitted
(:mod:`.sweep`), so the queue needs nobody watching: the job's own supervisor waits here before
its first attempt, and takes a slot once one is free and every earlier job of the group that is
still waiting has taken its own (first come, first served, in the order of the grid). A slot
gives the job its block of GPUs (``CUDA_VISIBLE_DEVICES``); claims live in the run directories
(:mod:`orchestrator.store.groups`) and count until the job ends, so a job whose supervisor died
keeps its GPUs until it is resumed or cancelled. While it waits the job answers ``cancel`` (it
ends CANCELLED without starting) and a stop of its supervisor (it stays QUEUED; ``orchestrate
resume JOB`` takes it over and it waits again).
"""
from __future__ import annotations

import dataclasses
import os

from ..states import JobState
from ..store import groups
from ..store.lease import LeaseLost, supervisor_health
from ..store.ledger import FencedOut, Job, Ledger
from ..store.paths import orchestrate_home
from .supervisor import Supervisor

POLL_S = 0.5


def wait_turn(sup: Supervisor, job: Job) -> bool:
    """Wait until ``job`` may start (True), or say it will not (False: cancelled while queued, or this
    supervisor lost the job). Jobs outside a local group go at once; so does one that holds its slot."""
    if not job.group_id or job.backend != "local":
        return True
    home = orchestrate_home()
    group = groups.read_group(home, job.group_id)
    if group is None:
        return True
    try:
        claim = groups.read_claim(job.run_dir)
        if job.state.is_terminal:   # run again (resume): its old slot went to others when it ended
            groups.drop_claim(job.run_dir)
            claim = None
        elif claim is None and job.attempts:
            return True   # started before the queue knew it (nothing to wait for)
        if claim is None:
            claim = _wait(sup, home, group, job)
            if claim is None:
                return False
        if claim.get("devices"):
            env = {**sup.plan.env, "CUDA_VISIBLE_DEVICES": claim["devices"]}
            sup.plan = dataclasses.replace(sup.plan, env=env)
        return True
    except (LeaseLost, FencedOut) as exc:
        sup.on_event(f"this supervisor no longer holds the job ({exc}); leaving it alone")
        return False


def _wait(sup: Supervisor, home, group: groups.Group, job: Job) -> dict | None:
    place = group.job_ids.index(job.id) + 1 if job.id in group.job_ids else "?"
    sup.write_job(state=JobState.QUEUED, supervisor_pid=os.getpid(),
                  message=f"queued ({place} of {len(group.points)} in group {group.id}; "
                          f"{group.max_parallel} at once): waiting for a free slot")
    while True:
        sup._poll_requests()   # raises LeaseLost when the supervisor is told to stop
        if sup.cancel_requested:
            sup._finish(JobState.CANCELLED, f"{sup.cancel_reason} while queued (it never started)")
            return None
        claim = try_claim(sup.ledger, home, group, job.id)
        if claim is not None:
            devices = f", GPUs {claim['devices']}" if claim.get("devices") else ""
            sup.write_job(state=JobState.PENDING, message=f"slot {claim['slot'] + 1} of {group.max_parallel} "
                          f"free{devices}: starting")
            sup.on_event(f"its turn in group {group.id}: slot {claim['slot'] + 1}{devices}")
            return claim
        sup.lease.check()
        sup.sleep(POLL_S)


def try_claim(ledger: Ledger, home, group: groups.Group, job_id: str, now: float | None = None) -> dict | None:
    """Take the lowest free slot of ``group`` for ``job_id`` if it is the job's turn; None if not yet."""
    with groups.group_lock(home, group.id):
        taken: set[int] = set()
        ahead = True
        for other_id in group.job_ids:
            if other_id == job_id:
                ahead = False
                continue
            other = ledger.get(other_id)
            if other is None or other.state.is_terminal:
                continue
            claim = groups.read_claim(other.run_dir)
            if claim is not None:
                taken.add(claim["slot"])
            elif ahead and other.state is JobState.QUEUED and supervisor_health(other.run_dir, now).alive:
                return None   # an earlier job still waits for its turn: it goes first
        free = [k for k in range(group.max_parallel) if k not in taken]
        if not free:
            return None
        run_dir = ledger.get(job_id).run_dir
        return groups.write_claim(run_dir, free[0], group.devices_for(free[0]))

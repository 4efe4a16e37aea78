"""Verbs that act on jobs: validate, submit, resume, cancel."""
from __future__ import annotations

import sys

from .common import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, print_notices


def validate(args) -> int:
    """``orchestrate validate CONFIG``: check and plan, start nothing."""
    from ..plan.prepare import prepare

    cfg, plan = prepare(args.config)
    print_notices(plan.notices)
    print(f"{args.config}: OK ({plan.device}, {plan.world_size} process(es), {plan.distributed})")
    return EXIT_OK


def submit(args) -> int:
    """``orchestrate submit CONFIG``: plan, create the job, supervise it (here or detached)."""
    from ..backends.processes import spawn_supervisor
    from ..dashboard.plan_view import describe_plan
    from ..plan.prepare import prepare
    from ..store.jobs import open_ledger
    from ..store.paths import orchestrate_home
    from ..supervise.jobs import create_job

    cfg, plan = prepare(args.config, backend=args.backend)
    if args.dry_run:
        print(describe_plan(plan), end="")
        return EXIT_OK
    print_notices(plan.notices)
    if plan.backend == "slurm":  # issue 4: sbatch --test-only, before anything is written or queued
        from ..backends.slurm.submit import preflight
        from ..config import ConfigError

        problems = preflight(plan)
        if problems:
            raise ConfigError(str(cfg.source), problems)
    ledger = open_ledger()
    job = create_job(cfg, plan, ledger)
    if args.detach:
        spawn_supervisor(job.id, orchestrate_home(), plan.paths.run_dir)
        print(job.id)
        return EXIT_OK
    print(f"job {job.id}: run dir {job.run_dir}  (Ctrl-C cancels the job)", file=sys.stderr)
    return run_foreground(ledger, job, resume=False)


def run_foreground(ledger, job, resume: bool) -> int:
    """Supervise ``job`` in this process beside its live view; the exit status of the job's end."""
    from ..dashboard.live import LiveView
    from ..states import JobState
    from ..supervise.control import supervise

    with LiveView(ledger, job.id) as view:
        state = supervise(ledger, job, resume=resume, on_event=view.event)
    return {JobState.COMPLETED: EXIT_OK, JobState.CANCELLED: EXIT_CANCELLED}.get(state, EXIT_FAILED)


def resume(args) -> int:
    """``orchestrate resume JOB``: take the job over (its attempt may still run) or rerun it."""
    from pathlib import Path

    from ..backends.processes import spawn_supervisor
    from ..store.jobs import open_ledger, resolve_job
    from ..store.paths import orchestrate_home
    from ..supervise.control import check_resumable

    ledger = open_ledger()
    job = resolve_job(ledger, args.job)
    check_resumable(job)
    if args.detach:
        spawn_supervisor(job.id, orchestrate_home(), Path(job.run_dir), resume=True)
        print(job.id)
        return EXIT_OK
    return run_foreground(ledger, job, resume=True)


def cancel(args) -> int:
    """``orchestrate cancel JOB``: end the job and every process of it, and check none is left."""
    from ..store.jobs import open_ledger, resolve_job
    from ..supervise.control import cancel as cancel_job

    ledger = open_ledger()
    job = resolve_job(ledger, args.job)
    left = cancel_job(ledger, job)
    if left:
        print(f"error: {job.id}: processes still alive after cancel: {left}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{job.id}: {ledger.get(job.id).state.value}; no process of the job is left")
    return EXIT_OK

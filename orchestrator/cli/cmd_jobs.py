"""Verbs that act on jobs: validate, submit, resume, cancel."""
from __future__ import annotations

import sys

from ..errors import JobError
from .common import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, print_notices


def overrides_of(args) -> list:
    """The ``KEY=VALUE`` arguments (issue 19); bad ones are a ConfigError (exit 2) naming each."""
    from ..config import ConfigError
    from ..config.overrides import parse_overrides

    overrides, problems = parse_overrides(list(getattr(args, "overrides", None) or []))
    if problems:
        raise ConfigError(args.config, problems)
    return overrides


def validate(args) -> int:
    """``orchestrate validate CONFIG [KEY=VALUE ...] [--sweep ...]``: check and plan, start nothing."""
    from ..plan.prepare import prepare

    if args.sweep:
        from .cmd_group import sweep

        return sweep(args, overrides_of(args), validate_only=True)
    cfg, plan = prepare(args.config, script=args.script, overrides=overrides_of(args))
    check_output_dir(cfg, plan)    # what submit would refuse, validate refuses too
    print_notices(plan.notices)
    print(f"{args.config}: OK ({plan.device}, {plan.world_size} process(es), {plan.distributed})"
          + (f" with {' '.join(plan.overrides)}" if plan.overrides else ""))
    return EXIT_OK


def as_if(args):
    """``--gpus N [--gpu-memory GIB]``: this machine's CPUs with N GPUs of that memory (None: detect)."""
    if args.gpus is None:
        if args.gpu_memory is not None:
            raise JobError("--gpu-memory needs --gpus")
        return None
    import os
    import socket

    from ..plan.topology import Topology

    if args.gpus < 0:
        raise JobError(f"--gpus: expected 0 or more, got {args.gpus}")
    return Topology(gpus=args.gpus, cpus=os.cpu_count() or 1, hostname=socket.gethostname(),
                    gpu_memory_gib=args.gpu_memory if args.gpus else None)


def check_output_dir(cfg, plan) -> None:
    """An output_dir holding another job's (or anybody's) checkpoints is refused before anything starts."""
    from ..store.jobs import open_ledger
    from ..store.paths import orchestrate_home
    from ..supervise.jobs import check_output_dir

    known = (orchestrate_home() / "runs").is_dir()   # no jobs yet: nothing to open (validate writes nothing)
    check_output_dir(plan, cfg, open_ledger() if known else None)


def submit(args) -> int:
    """``orchestrate submit CONFIG``: plan, create the job, supervise it (here or detached)."""
    from ..dashboard.plan_view import describe_plan
    from ..plan.prepare import prepare
    from ..store.jobs import open_ledger
    from ..supervise.control import detach, take_job
    from ..supervise.jobs import create_job

    if (args.gpus is not None or args.gpu_memory is not None) and not args.dry_run:
        raise JobError("--gpus/--gpu-memory preview a plan: use them with --dry-run (a real job plans on the GPUs "
                       "it finds)")
    if args.sweep:   # issue 19: one job per point, as a group
        from .cmd_group import sweep

        return sweep(args, overrides_of(args))
    if args.max_parallel is not None:
        raise JobError("--max-parallel: only with --sweep (how many jobs of the group run at once)")
    cfg, plan = prepare(args.config, backend=args.backend, script=args.script, topology=as_if(args),
                        overrides=overrides_of(args))
    check_output_dir(cfg, plan)
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
    if plan.backend == "slurm":   # issue 11: supervised inside its allocation; here we only submit and follow
        from ..supervise import remote

        slurm_job = remote.submit(ledger, job)
        if args.detach:
            print(job.id)
            return EXIT_OK
        print(f"job {job.id}: SLURM job {slurm_job}, run dir {job.run_dir}  (Ctrl-C cancels the job; closing "
              "this terminal does not)", file=sys.stderr)
        return follow_remote(ledger, job)
    lease = take_job(job)  # a new job: nobody else can hold it
    if args.detach:
        detach(job, lease, resume=False)
        print(job.id)
        return EXIT_OK
    print(f"job {job.id}: run dir {job.run_dir}  (Ctrl-C cancels the job)", file=sys.stderr)
    return run_foreground(ledger, job, lease, resume=False)


def run_foreground(ledger, job, lease, resume: bool) -> int:
    """Supervise ``job`` in this process beside its live view; the exit status of the job's end.

    If the terminal closes, the job is handed to a background supervisor and goes on (exit 0).
    """
    from ..dashboard.live import LiveView
    from ..states import JobState
    from ..supervise.control import supervise

    try:
        with LiveView(ledger, job.id) as view:
            state = supervise(ledger, job, lease, resume=resume, on_event=view.event, on_hangup=view.hang_up)
    finally:
        lease.release()
    if state is None:
        return EXIT_OK  # another supervisor holds the job now (hand-off, or it was taken over)
    return {JobState.COMPLETED: EXIT_OK, JobState.CANCELLED: EXIT_CANCELLED}.get(state, EXIT_FAILED)


def follow_remote(ledger, job) -> int:
    """Follow a job supervised elsewhere (inside its SLURM allocation) beside its live view."""
    from ..dashboard.live import LiveView
    from ..states import JobState
    from ..supervise import remote
    from ..supervise.control import cancel as cancel_job

    with LiveView(ledger, job.id) as view:
        state = remote.follow(ledger, job, view.event, lambda: cancel_job(ledger, ledger.get(job.id)))
    return {JobState.COMPLETED: EXIT_OK, JobState.CANCELLED: EXIT_CANCELLED}.get(state, EXIT_FAILED)


def resume(args) -> int:
    """``orchestrate resume JOB``: take the job over (its attempt may still run) or rerun it.

    Two at once: exactly one takes the job; the other says who supervises it and exits 0.
    """
    from ..store.jobs import open_ledger, resolve_job
    from ..store.lease import LeaseBusy
    from ..supervise.control import check_resumable, detach, take_over

    ledger = open_ledger()
    job = resolve_job(ledger, args.job)
    check_resumable(job)
    resized = _resized_plan(job, args)
    if job.backend == "slurm":   # issue 11: a new allocation (unless it has one); its supervisor runs inside
        from ..supervise import remote

        print(remote.resume(ledger, job, plan=resized))
        return EXIT_OK if args.detach else follow_remote(ledger, ledger.get(job.id))
    try:
        lease = take_over(job)   # issue 17: refuses while the attempt trains on another host, naming it
    except LeaseBusy as busy:
        print(f"{job.id} is already supervised by {busy.holder.describe()}; nothing to do")
        return EXIT_OK
    if resized is not None:
        from ..supervise.jobs import replace_plan

        replace_plan(job, resized, max((a.n for a in job.attempts), default=0), fence=lease.check)
    job = ledger.get(job.id)  # as it is now that nobody else can change it
    if args.detach:
        detach(job, lease, resume=True)
        print(job.id)
        return EXIT_OK
    return run_foreground(ledger, job, lease, resume=True)


def _resized_plan(job, args):
    """The job's plan on ``--nproc-per-node``/``--nodes`` (None without them); says what changes, and
    names the keys of the job's config file that were edited since it was submitted (never applied)."""
    from ..supervise.jobs import config_changes, load_plan

    changes = config_changes(job)
    if changes:
        print(f"notice: {job.config_path} was edited since {job.id} was submitted ({'; '.join(changes)}); "
              f"resume runs the job's frozen plan, not the edited file: the world size changes only with "
              f"--nproc-per-node/--nodes, anything else needs a new job", file=sys.stderr)
    if args.nproc_per_node is None and args.nodes is None:
        return None
    if not job.state.is_terminal:
        raise JobError(f"{job.id} is {job.state.value}: only a job that has ended can change its world size "
                       f"(orchestrate cancel {job.id} first; its checkpoints stay)")
    from ..plan.resize import resize_plan

    plan = load_plan(job)
    new, said = resize_plan(plan, args.nodes or plan.nnodes, args.nproc_per_node or plan.nproc_per_node)
    for line in said:
        print(f"notice: {line}", file=sys.stderr)
    return new


def cancel(args) -> int:
    """``orchestrate cancel JOB``: end the job and every process of it, and check none is left."""
    from ..store.jobs import open_ledger, resolve_job
    from ..supervise.control import cancel as cancel_job

    if args.group or not args.job:
        from .cmd_group import cancel_group

        return cancel_group(args)
    ledger = open_ledger()
    job = resolve_job(ledger, args.job)
    left = cancel_job(ledger, job)
    if left:
        print(f"error: {job.id}: processes still alive after cancel: {left}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{job.id}: {ledger.get(job.id).state.value}; no process of the job is left")
    return EXIT_OK


def checkpoint(args) -> int:
    """``orchestrate checkpoint JOB``: save now; print the complete checkpoint's path."""
    from ..store.jobs import open_ledger, resolve_job
    from ..supervise.on_demand import request_checkpoint

    ledger = open_ledger()
    job = resolve_job(ledger, args.job)
    print(f"{job.id}: asked to save at the next step boundary; waiting for every rank's part ...", file=sys.stderr)
    try:
        print(request_checkpoint(ledger, job, timeout_s=args.timeout))
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def export(args) -> int:
    """``orchestrate export JOB [--step N] --out DIR``: a verified Hugging Face folder from a checkpoint."""
    from ..store.jobs import open_ledger, resolve_job
    from ..supervise.final_model import export_checkpoint
    from ..supervise.jobs import load_plan

    ledger = open_ledger()
    job = resolve_job(ledger, args.job)
    result = export_checkpoint(job, load_plan(job), args.step, args.out)
    if result["verdict"] != "verified":
        print(f"warning: {result['folder']} written, but not verified: {result['reason']}", file=sys.stderr)
    print(f"{job.id}: checkpoint-{result['step']} -> {result['folder']}" + (
        f" (verified, {result['method']}: config and tokenizer load, every tensor equals the checkpoint's)"
        if result["verdict"] == "verified" else ""))
    return EXIT_OK

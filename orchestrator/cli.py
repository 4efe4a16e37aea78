"""``orchestrate``: thin command-line verbs over the library (see ``orchestrate --help``).

Imports are deferred into each verb so that ``--help``, ``status`` and ``list``
never import torch or transformers.
"""
from __future__ import annotations

import argparse
import json
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130

SUBMIT_HELP = """\
Validate CONFIG, plan the launch and run it under a supervisor.

In the foreground the live status of the job is shown until it ends; Ctrl-C
CANCELS the job (every process of it is ended). Use --detach to hand the job to
a background supervisor that survives the terminal: it prints only the job id.
Exit status: 0 completed, 1 failed, 2 bad config or usage, 130 cancelled."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orchestrate", description="Launch, follow and resume LLM fine-tuning jobs.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    s = sub.add_parser("submit", help="validate, plan and run a training config",
                       description=SUBMIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("config")
    s.add_argument("--dry-run", action="store_true", help="print the plan (command, env, paths) and start nothing")
    s.add_argument("--detach", action="store_true", help="supervise in the background; print only the job id")

    v = sub.add_parser("validate", help="check a config and report every problem; start nothing")
    v.add_argument("config")

    ls = sub.add_parser("list", help="jobs in the ledger, newest first")
    ls.add_argument("--state", action="append", help="only jobs in this state (repeatable)")
    ls.add_argument("--json", action="store_true")

    st = sub.add_parser("status", help="status of all jobs, or one job in detail")
    st.add_argument("job", nargs="?")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    c = sub.add_parser("cancel", help="end a job and every process of it")
    c.add_argument("job")

    r = sub.add_parser("resume", help="take over a job whose supervisor is gone, or rerun a failed one")
    r.add_argument("job")
    r.add_argument("--detach", action="store_true")

    lg = sub.add_parser("logs", help="print a job's rank logs")
    lg.add_argument("job")
    lg.add_argument("--attempt", type=int, help="attempt number (default: the last)")
    lg.add_argument("--rank", type=int, help="only this rank")

    d = sub.add_parser("demo", help="build the tiny local demo model and data set")
    d.add_argument("action", choices=["prepare"])
    d.add_argument("--dir", default=".demo")
    d.add_argument("--force", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .jobs import JobError

    handler = {"submit": _submit, "validate": _validate, "list": _list, "status": _status, "cancel": _cancel,
               "resume": _resume, "logs": _logs, "demo": _demo}[args.verb]
    try:
        return handler(args)
    except ConfigError as exc:
        for n in exc.notices:
            print(f"notice: {n}", file=sys.stderr)
        print(exc.render(), file=sys.stderr)
        return EXIT_USAGE
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_CANCELLED


def _notices(notices) -> None:
    for n in notices:
        print(f"notice: {n}", file=sys.stderr)


def _validate(args) -> int:
    from .jobs import prepare

    cfg, plan = prepare(args.config)
    _notices(plan.notices)
    print(f"{args.config}: OK ({plan.device}, {plan.world_size} process(es), {plan.distributed})")
    return EXIT_OK


def _submit(args) -> int:
    from .jobs import create_job, open_ledger, prepare, spawn_supervisor
    from .paths import orchestrate_home
    from .plan import describe_plan

    cfg, plan = prepare(args.config)
    if args.dry_run:
        print(describe_plan(plan), end="")
        return EXIT_OK
    _notices(plan.notices)
    ledger = open_ledger()
    job = create_job(cfg, plan, ledger)
    if args.detach:
        spawn_supervisor(job.id, orchestrate_home())
        print(job.id)
        return EXIT_OK
    print(f"job {job.id}: run dir {job.run_dir}  (Ctrl-C cancels the job)", file=sys.stderr)
    return _run_foreground(ledger, job, resume=False)


def _run_foreground(ledger, job, resume: bool) -> int:
    from .control import supervise
    from .live import LiveView
    from .states import JobState

    with LiveView(ledger, job.id) as view:
        state = supervise(ledger, job, resume=resume, on_event=view.event)
    return {JobState.COMPLETED: EXIT_OK, JobState.CANCELLED: EXIT_CANCELLED}.get(state, EXIT_FAILED)


def _resume(args) -> int:
    from .control import check_resumable
    from .jobs import open_ledger, resolve_job, spawn_supervisor
    from .paths import orchestrate_home

    ledger = open_ledger()
    job = resolve_job(ledger, args.job)
    check_resumable(job)
    if args.detach:
        spawn_supervisor(job.id, orchestrate_home(), resume=True)
        print(job.id)
        return EXIT_OK
    return _run_foreground(ledger, job, resume=True)


def _cancel(args) -> int:
    from .control import cancel
    from .jobs import open_ledger, resolve_job

    ledger = open_ledger()
    job = resolve_job(ledger, args.job)
    left = cancel(ledger, job)
    if left:
        print(f"error: {job.id}: processes still alive after cancel: {left}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{job.id}: {ledger.get(job.id).state.value}; no process of the job is left")
    return EXIT_OK


def _list(args) -> int:
    from .jobs import open_ledger
    from .states import JobState

    try:
        states = [JobState(s.upper()) for s in args.state or []]
    except ValueError:
        print(f"error: --state must be one of {[s.value for s in JobState]}", file=sys.stderr)
        return EXIT_USAGE
    jobs = open_ledger().jobs(states or None)
    if args.json:
        print(json.dumps([j.to_json() for j in jobs], indent=1, sort_keys=True))
        return EXIT_OK
    from .live import print_table

    print_table(jobs)
    return EXIT_OK


def _status(args) -> int:
    from .jobs import open_ledger, resolve_job
    from .live import print_detail, print_table, snapshot

    ledger = open_ledger()
    if args.job:
        job = resolve_job(ledger, args.job)
        if args.json:
            snap = snapshot(job)
            data = job.to_json()
            data.update(step=snap.progress.step or job.step, max_steps=snap.progress.max_steps or job.max_steps,
                        loss=snap.progress.loss, tokens_per_s=snap.progress.tokens_per_s,
                        last_checkpoint=snap.progress.last_checkpoint,
                        distributed_type=snap.progress.distributed_type or job.distributed_type,
                        fsdp_version=snap.progress.fsdp_version, world_size=snap.progress.world_size)
            print(json.dumps(data, indent=1, sort_keys=True))
        else:
            print_detail(job)
        return EXIT_OK
    jobs = ledger.jobs()
    if args.json:
        print(json.dumps([j.to_json() for j in jobs], indent=1, sort_keys=True))
    else:
        print_table(jobs)
    return EXIT_OK


def _logs(args) -> int:
    from pathlib import Path

    from .jobs import open_ledger, resolve_job
    from .paths import RunPaths

    job = resolve_job(open_ledger(), args.job)
    if not job.attempts:
        print(f"{job.id}: no attempt has started yet", file=sys.stderr)
        return EXIT_OK
    n = args.attempt or job.attempts[-1].n
    files = sorted(RunPaths(Path(job.run_dir)).rank_log_dir(n).glob("**/std*.log"))
    for f in files:
        rank = f.parent.name
        if args.rank is not None and rank != str(args.rank):
            continue
        for line in f.read_text(errors="replace").splitlines():
            print(f"[attempt {n} rank {rank} {f.stem}] {line}")
    return EXIT_OK


def _demo(args) -> int:
    from pathlib import Path

    from .demo import prepare_demo

    out = prepare_demo(Path(args.dir), force=args.force)
    print(f"demo assets ready in {out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

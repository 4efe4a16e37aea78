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
CANCELS the job (every process of it is ended), as the top line of the view says.
Use --detach to hand the job to a background supervisor that survives the
terminal: it prints only the job id; watch it with `orchestrate status JOB` or
`orchestrate logs JOB -f` (Ctrl-C there only leaves the view).
Exit status: 0 completed, 1 failed, 2 bad config or usage, 130 cancelled."""

STATUS_HELP = """\
Without JOB: every job in the ledger (state, attempt n/budget, progress, loss and
its trend, tokens/s, ETA, last verified checkpoint, elapsed time). With JOB: that
job in detail (loss curve, attempts and why each ended, first error, where the logs
are). On a terminal the view refreshes until Ctrl-C, which only leaves the view:
the jobs keep running. Without a terminal, or with --once, one frame is printed
as plain text."""

LOGS_HELP = """\
Every rank's stdout and stderr with a [rank R] prefix (like tail; -f follows).
A failed attempt ends with its first error (the rank it came from) and where its
traceback is; --errors prints just that."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orchestrate", description="Launch, follow and resume LLM fine-tuning jobs.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    s = sub.add_parser("submit", help="validate, plan and run a training config",
                       description=SUBMIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("config")
    s.add_argument("--dry-run", action="store_true", help="print the plan (command, env, paths) and start nothing")
    s.add_argument("--detach", action="store_true", help="supervise in the background; print only the job id")
    s.add_argument("--backend", choices=["local", "slurm"], help="override launch.backend of the config")

    v = sub.add_parser("validate", help="check a config and report every problem; start nothing")
    v.add_argument("config")

    ls = sub.add_parser("list", help="jobs in the ledger, newest first")
    ls.add_argument("--state", action="append", help="only jobs in this state (repeatable; RUNNING, FAILED, ...)")
    ls.add_argument("--json", action="store_true")

    st = sub.add_parser("status", help="live view of all jobs, or of one job in detail",
                        description=STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("job", nargs="?")
    st.add_argument("--once", action="store_true", help="print one frame and exit (the default without a terminal)")
    st.add_argument("--json", action="store_true", help="machine-readable output (one frame)")
    st.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between frames (default 1)")

    c = sub.add_parser("cancel", help="end a job and every process of it")
    c.add_argument("job")

    r = sub.add_parser("resume", help="take over a job whose supervisor is gone, or rerun a failed one")
    r.add_argument("job")
    r.add_argument("--detach", action="store_true")

    lg = sub.add_parser("logs", help="print or follow a job's rank logs; find the first error",
                        description=LOGS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    lg.add_argument("job")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the attempt "
                    "(--attempt) or the job ends")
    lg.add_argument("--attempt", type=int, help="attempt number (default: the last)")
    lg.add_argument("--rank", type=int, help="only this rank")
    lg.add_argument("-n", "--lines", type=int, metavar="N", help="only the last N lines of each file "
                    "(default: all; 10 with -f)")
    lg.add_argument("--errors", action="store_true", help="only the first error of the (last failed) attempt "
                    "and its traceback")

    rp = sub.add_parser("report", help="write a PNG of loss and tokens/s over steps (needs matplotlib)")
    rp.add_argument("job")
    rp.add_argument("--out", help="PNG file to write (default: ./<job id>.png)")

    d = sub.add_parser("demo", help="build the tiny local demo model and data set")
    d.add_argument("action", choices=["prepare"])
    d.add_argument("--dir", default=".demo")
    d.add_argument("--force", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import ConfigError, JobError

    handler = {"submit": _submit, "validate": _validate, "list": _list, "status": _status, "cancel": _cancel,
               "resume": _resume, "logs": _logs, "report": _report, "demo": _demo}[args.verb]
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
    except BrokenPipeError:  # `orchestrate list | head`
        sys.stderr.close()
        return EXIT_OK


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

    cfg, plan = prepare(args.config) if not args.backend else _prepare_with_backend(args.config, args.backend)
    if args.dry_run:
        print(describe_plan(plan), end="")
        return EXIT_OK
    _notices(plan.notices)
    if plan.backend == "slurm":  # issue 4: sbatch --test-only, before anything is written or queued
        from .backends.slurm import preflight
        from .config import ConfigError

        problems = preflight(plan)
        if problems:
            raise ConfigError(str(cfg.source), problems)
    ledger = open_ledger()
    job = create_job(cfg, plan, ledger)
    if args.detach:
        spawn_supervisor(job.id, orchestrate_home())
        print(job.id)
        return EXIT_OK
    print(f"job {job.id}: run dir {job.run_dir}  (Ctrl-C cancels the job)", file=sys.stderr)
    return _run_foreground(ledger, job, resume=False)


def _prepare_with_backend(config: str, backend: str):
    """``jobs.prepare`` with ``launch.backend`` replaced by ``submit --backend`` (issue 4)."""
    import dataclasses
    import os

    from .config import load_config
    from .jobs import new_job_id
    from .paths import orchestrate_home
    from .plan import default_worker_script, make_plan
    from .topology import detect_topology

    cwd = os.getcwd()
    cfg = load_config(config, cwd=cwd)
    cfg = dataclasses.replace(cfg, launch=dataclasses.replace(cfg.launch, backend=backend))
    plan = make_plan(cfg, detect_topology(), job_id=new_job_id(cfg.name), home=orchestrate_home(),
                     python=sys.executable, worker_script=default_worker_script(), workdir=cwd)
    return cfg, plan


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
    from .live import print_list

    print_list(jobs)
    return EXIT_OK


def _status(args) -> int:
    from .jobs import open_ledger, resolve_job
    from .live import SnapshotSource, make_console, watch
    from .render import detail_frame, snapshot_json, status_frame

    ledger = open_ledger()
    job = resolve_job(ledger, args.job) if args.job else None
    if not args.once and not args.json and sys.stdout.isatty():
        return watch(ledger, job.id if job else None, interval=max(0.2, args.interval))
    source = SnapshotSource.for_ledger(ledger)
    if args.json:
        data = snapshot_json(source.snapshot(job, detail=True), detail=True) if job else \
            [snapshot_json(s) for s in source.all()]
        print(json.dumps(data, indent=1, sort_keys=True))
    elif job:
        make_console().print(detail_frame(source.snapshot(job, detail=True)))
    else:
        import time

        make_console().print(status_frame(source.all(), time.time()))
    return EXIT_OK


def _logs(args) -> int:
    from .jobs import open_ledger, resolve_job
    from .logview import show_logs

    ledger = open_ledger()
    job = resolve_job(ledger, args.job)
    return show_logs(ledger, job, attempt=args.attempt, rank=args.rank, follow=args.follow, errors=args.errors,
                     lines=args.lines)


def _report(args) -> int:
    from .jobs import open_ledger, resolve_job
    from .report import ReportUnavailable, write_report

    job = resolve_job(open_ledger(), args.job)
    try:
        out = write_report(job, args.out or f"{job.id}.png")
    except ReportUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(out)
    return EXIT_OK


def _demo(args) -> int:
    from pathlib import Path

    from .demo import prepare_demo

    out = prepare_demo(Path(args.dir), force=args.force)
    print(f"demo assets ready in {out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""Verbs that only read: list, status, logs, report; and demo (builds the demo assets)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import EXIT_OK, EXIT_USAGE


def list_jobs(args) -> int:
    """``orchestrate list``: ledger columns only, fast for any number of jobs."""
    from ..states import JobState
    from ..store.jobs import open_ledger

    try:
        states = [JobState(s.upper()) for s in args.state or []]
    except ValueError:
        print(f"error: --state must be one of {[s.value for s in JobState]}", file=sys.stderr)
        return EXIT_USAGE
    if args.group:   # issue 19: one sweep's jobs
        from .cmd_group import list_group

        return list_group(args, states)
    jobs = open_ledger().jobs(states or None)
    if args.json:
        print(json.dumps([j.to_json() for j in jobs], indent=1, sort_keys=True))
        return EXIT_OK
    from ..dashboard.live import print_list

    print_list(jobs)
    return EXIT_OK


def status(args) -> int:
    """``orchestrate status [JOB]``: live on a terminal, else one frame (or ``--json``)."""
    from ..dashboard.live import SnapshotSource, make_console, watch
    from ..dashboard.render import detail_frame, snapshot_json, status_frame
    from ..store.jobs import open_ledger, resolve_job

    if args.group:   # issue 19: a sweep as one table
        if args.job:
            print("error: status: give JOB or --group G, not both", file=sys.stderr)
            return EXIT_USAGE
        from .cmd_group import status_group

        return status_group(args)
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


def logs(args) -> int:
    """``orchestrate logs JOB``: rank logs, followed with ``-f``; ``--errors``: the first error."""
    from ..dashboard.logview import show_logs
    from ..store.jobs import open_ledger, resolve_job

    ledger = open_ledger()
    job = resolve_job(ledger, args.job)
    return show_logs(ledger, job, attempt=args.attempt, rank=args.rank, follow=args.follow, errors=args.errors,
                     lines=args.lines)


def report(args) -> int:
    """``orchestrate report JOB``: a PNG of loss and tokens/s."""
    from ..dashboard.report import ReportUnavailable, write_report
    from ..store.jobs import open_ledger, resolve_job

    job = resolve_job(open_ledger(), args.job)
    try:
        out = write_report(job, args.out or str(Path(job.run_dir) / "report.png"))   # not into a repository
    except ReportUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(out)
    return EXIT_OK


def demo(args) -> int:
    """``orchestrate demo prepare``: the tiny local model and data set."""
    from pathlib import Path

    from ..demo import prepare_demo

    out = prepare_demo(Path(args.dir), force=args.force)
    print(f"demo assets ready in {out}")
    return EXIT_OK

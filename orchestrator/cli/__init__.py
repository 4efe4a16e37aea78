"""``orchestrate``: thin command-line verbs over the library (see ``orchestrate --help``).

Imports are deferred into each verb so that ``--help``, ``status`` and ``list``
never import torch or transformers. Verbs that act on jobs are in :mod:`.cmd_jobs`,
verbs that only read in :mod:`.cmd_view`.
"""
from __future__ import annotations

import sys

from .common import EXIT_CANCELLED, EXIT_OK, EXIT_USAGE
from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    """Run one verb; return the exit status (0 completed, 1 failed, 2 bad input, 130 cancelled)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE may come after options too (`submit cfg.yaml --detach lr=1e-5`): argparse leaves those over
    if extra and hasattr(args, "overrides") and not any(a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from ..store.private import private_umask

    private_umask()   # issue 17: what orchestrate and the jobs it starts create is the user's alone
    from ..config import ConfigError
    from ..errors import JobError
    from . import cmd_jobs, cmd_view

    handler = {"submit": cmd_jobs.submit, "validate": cmd_jobs.validate, "cancel": cmd_jobs.cancel,
               "resume": cmd_jobs.resume, "checkpoint": cmd_jobs.checkpoint,
               "export": cmd_jobs.export, "list": cmd_view.list_jobs, "status": cmd_view.status,
               "logs": cmd_view.logs, "report": cmd_view.report, "demo": cmd_view.demo}[args.verb]
    if args.verb not in ("demo", "validate"):
        _warn_unsupervised(args.verb, getattr(args, "job", None))
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


def _warn_unsupervised(verb: str, named: str | None) -> None:
    """On stderr: every unfinished job whose supervisor is gone, with the command that adopts it."""
    from ..states import JobState
    from ..store.lease import supervisor_health, unsupervised
    from ..store.ledger import Ledger
    from ..store.paths import orchestrate_home

    home = orchestrate_home()
    if not (home / "runs").is_dir():
        return
    try:
        jobs = Ledger.for_home(home).jobs([JobState.QUEUED, JobState.PENDING, JobState.RUNNING, JobState.RESUMING])
    except Exception:  # noqa: BLE001 - a warning must never stop the verb itself
        return
    said = {}
    if any(job.backend == "slurm" for job in jobs):
        from ..supervise.remote import reconcile_all

        said = reconcile_all(Ledger.for_home(home), jobs)   # one squeue/sacct call for all of them
    for job in jobs:
        if job.id in said:
            print(f"notice: job {job.id}: {said[job.id]}", file=sys.stderr)
            continue
        if verb in ("resume", "cancel") and named and job.id.startswith(named):
            continue  # the verb about to repair it
        health = supervisor_health(job.run_dir)
        if unsupervised(job, health):
            who = f" (pid {health.pid} on {health.host}, last heartbeat {health.heartbeat_age_s:.0f} s ago)" \
                if health.pid else ""
            print(f"warning: job {job.id} is {job.state.value} but its supervisor is gone{who}; "
                  f"run: orchestrate resume {job.id}", file=sys.stderr)

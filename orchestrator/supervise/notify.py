"""Telling someone that a job ended (``launch.notify``, issue 19), without ever holding the job up.

When the supervisor records a job's end, :func:`notify_end` starts the sender
(``python -m orchestrator.cli.notify HOME JOB STATE``, :mod:`orchestrator.cli.notify`) in a session of
its own and goes on: the sender runs the user's command with the job's status JSON on stdin and posts
the webhook (with retries), logging to ``<run dir>/notify.log``. Nothing it does changes the job's
state. Inside a SLURM allocation the sender runs to its end before the supervisor returns (bounded),
since the allocation's end would kill a process left behind.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Mapping

from ..backends.processes import run_module, spawn_module
from ..plan import LaunchPlan
from ..states import JobState
from ..store.paths import orchestrate_home

SENDER = "orchestrator.cli.notify"
LOG = "notify.log"


def wanted(notify: Mapping, state: JobState) -> bool:
    """Whether ``launch.notify`` (as planned) asks to hear about ``state``."""
    return bool(notify) and bool(notify.get("command") or notify.get("webhook")) and \
        state.value in notify.get("when", ())


def notify_end(plan: LaunchPlan, state: JobState, say: Callable[[str], None] | None = None) -> None:
    """Start the sender if ``launch.notify`` wants this end; a failure to start it is said, never raised."""
    if not wanted(plan.notify, state):
        return
    say = say or (lambda message: None)
    args = [str(orchestrate_home()), plan.job_id, state.value]
    log = Path(plan.run_dir) / LOG
    what = " and ".join(k for k in ("command", "webhook") if plan.notify.get(k))
    try:
        if plan.backend == "slurm" and os.environ.get("SLURM_JOB_ID"):
            limit = (plan.notify.get("retries", 3) + 2) * plan.notify.get("timeout_s", 30.0)
            rc, out, err = run_module(sys.executable, SENDER, args, timeout_s=min(limit, 120.0))
            with open(log, "a") as f:
                f.write(out + err)
            say(f"notified ({what}): exit {rc}, see {log}")
            return
        pid = spawn_module(sys.executable, SENDER, args, log)
    except OSError as exc:   # the job has ended as recorded; a notification must never change that
        say(f"could not start the notification ({what}): {exc}")
        return
    say(f"notifying ({what}) in the background (pid {pid}; log {log})")

"""Entry point of a detached supervisor: ``python -m orchestrator.supervise.daemon JOB [--resume]``.

Started by ``submit --detach``, ``resume --detach`` and a foreground ``submit`` whose terminal
closed, in a session of its own, so it survives the terminal. It takes the job's lease (with
the token of the process handing the job over, from ``$ORCHESTRATE_HANDOFF``), or exits
saying who holds it.
"""
from __future__ import annotations

import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from ..backends.processes import ENV_HANDOFF
    from ..states import JobState
    from ..store.jobs import open_ledger, resolve_job
    from ..store.lease import LeaseBusy
    from ..store.private import private_umask
    from .control import supervise, take_job

    def say(message: str) -> None:
        print(time.strftime("%Y-%m-%d %H:%M:%S"), message, flush=True)

    argv = sys.argv[1:] if argv is None else argv
    private_umask()
    ledger = open_ledger()
    job = resolve_job(ledger, argv[0])
    token = os.environ.pop(ENV_HANDOFF, None)
    try:
        lease = take_job(job, handoff_token=token)
    except LeaseBusy as busy:
        say(f"{job.id} is already supervised by {busy.holder.describe()}; this supervisor exits")
        return 0
    say(f"supervising {job.id} (pid {os.getpid()}, lease generation {lease.gen})")
    try:
        state = supervise(ledger, job, lease, resume="--resume" in argv, foreground=False, on_event=say)
    finally:
        lease.release()
    return 0 if state in (JobState.COMPLETED, None) else 1


if __name__ == "__main__":
    sys.exit(main())

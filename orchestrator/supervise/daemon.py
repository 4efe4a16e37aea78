"""Entry point of a detached supervisor: ``python -m orchestrator.supervise.daemon JOB [--resume]``.

Started by ``submit --detach`` / ``resume --detach`` in a session of its own, so it
survives the terminal; it writes its PID and a heartbeat into the ledger.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from ..states import JobState
    from ..store.jobs import open_ledger, resolve_job
    from .control import supervise

    argv = sys.argv[1:] if argv is None else argv
    ledger = open_ledger()
    job = resolve_job(ledger, argv[0])
    state = supervise(ledger, job, resume="--resume" in argv, on_event=lambda m: print(m, flush=True))
    return 0 if state is JobState.COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())

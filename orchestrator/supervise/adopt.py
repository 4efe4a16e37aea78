"""Taking a job over: every attempt its previous supervisor left open is found and handled.

Attempts are written ahead (STARTING before the backend starts them), so an open attempt
is one of: running and recorded (follow it again); started by a supervisor that died
before recording who runs it (found by the backend through its tags or scheduler record,
then followed); or never started at all (ended at once, WORKER_LOST). Only the newest open
attempt can still be followed; an older one (a supervisor died while adopting) is ended.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..backends.base import AttemptHandle
from ..states import Failure
from ..store.ledger import RUNNING, AttemptRecord, Job
from .classify import classify


def adopt_open_attempts(sup, job: Job) -> AttemptHandle | None:
    """Handle the open attempts of ``job`` with supervisor ``sup``; return the one to follow, if any."""
    open_attempts = [a for a in job.attempts if a.is_open]
    follow = None
    for record in open_attempts:
        handle = attempt_handle(sup, record)
        if handle is None:
            sup.write_attempt(record.n, ended=time.time(), failure=Failure.WORKER_LOST.value, gained_checkpoint=0,
                              end_step=record.start_step, message="never started: its supervisor died while "
                                                                  "starting it")
            sup.on_event(f"attempt {record.n} was never started (its supervisor died while starting it)")
        elif record is open_attempts[-1]:
            follow = handle  # the follow loop gets its end even if it ended meanwhile
        else:
            _end(sup, record, handle)
    return follow


def attempt_handle(sup, record: AttemptRecord) -> AttemptHandle | None:
    """How to reach an open attempt: from its record, or found by the backend (``None``: never started)."""
    attempt_dir = str(sup.plan.paths.attempt_dir(record.n))
    if record.status != "STARTING" or record.pid or record.external_id:
        return AttemptHandle(job_id=sup.plan.job_id, attempt=record.n, pid=record.pid or 0, attempt_dir=attempt_dir,
                             external_id=record.external_id, pid_start=record.pid_start, host=record.host)
    found = sup.backend.find(sup.plan, record.n)
    if found is not None:
        sup.write_attempt(record.n, status=RUNNING, pid=found.pid or None, pid_start=found.pid_start,
                          host=found.host, external_id=found.external_id)
        sup.on_event(f"attempt {record.n} was started by a supervisor that died before recording it; found it "
                     f"(pid {found.pid or found.external_id})")
    return found


def _end(sup, record: AttemptRecord, handle: AttemptHandle) -> None:
    from .outcome import attempt_outcome

    sup.kill(handle, grace_s=10.0)
    outcome = attempt_outcome(Path(handle.attempt_dir), sup.backend.poll(handle))
    failure = classify(outcome)
    sup.write_attempt(record.n, ended=time.time(), exit_code=outcome.returncode, failure=failure.value,
                      gained_checkpoint=0, end_step=record.start_step,
                      message="an older attempt left open by a dead supervisor; ended")

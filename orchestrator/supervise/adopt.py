"""Taking a job over: every attempt its previous supervisor left open is found and handled.

Attempts are written ahead (STARTING before the backend starts them), so an open attempt
is one of: running and recorded (follow it again); started by a supervisor that died
before recording who runs it (found by the backend through its tags or scheduler record,
then followed); or never started at all (ended at once, WORKER_LOST). Only the newest open
attempt can still be followed; an older one (a supervisor died while adopting) is ended.
An attempt started on another host is never followed from here (its processes are not in this
host's process table): while its ranks beat the job is left to that host; once they fell silent
the attempt is ended and asked to stop, should its ranks wake (:mod:`.elsewhere`).
"""
from __future__ import annotations

import socket
import time
from pathlib import Path

from ..backends.base import AttemptHandle
from ..states import Failure
from ..store.lease import LeaseLost
from ..store.ledger import RUNNING, AttemptRecord, Job
from . import elsewhere
from .classify import classify
from .outcome import attempt_outcome


def adopt_open_attempts(sup, job: Job) -> AttemptHandle | None:
    """Handle the open attempts of ``job`` with supervisor ``sup``; return the one to follow, if any."""
    open_attempts = [a for a in job.attempts if a.is_open]
    follow = None
    for record in open_attempts:
        remote = sup.backend is not None and sup.backend.name == "local" and not elsewhere.place(sup.plan, record).here
        if remote and not _ended_elsewhere(sup, job, record):
            continue   # silent ranks of another host: ended WORKER_LOST, asked to stop should they wake
        handle = attempt_handle(sup, record)   # of this host, or ended elsewhere (its records tell how)
        if handle is None:
            sup.write_attempt(record.n, ended=time.time(), failure=Failure.WORKER_LOST.value, gained_checkpoint=0,
                              end_step=record.start_step, message="never started: its supervisor died while "
                                                                  "starting it")
            sup.on_event(f"attempt {record.n} was never started (its supervisor died while starting it)")
        elif record is open_attempts[-1]:
            follow = handle  # the follow loop gets its end even if it ended meanwhile
            if not remote and record.n not in sup.lease.record.continues:
                sup.lease.continue_attempts(record.n)   # its ranks are this generation's: not fenced
        else:
            _end(sup, record, handle)
    return follow


def _ended_elsewhere(sup, job: Job, record: AttemptRecord) -> bool:
    """An open attempt started on another host: this host cannot see its processes, only their beat and records.

    Ranks that still beat are that host's to supervise: leave the job (:class:`LeaseLost`). Ranks that
    ended left their records: True, the attempt is followed to its end like any other (the backend
    reads another host's attempt from its records). Silent ones without a record are dead or paused:
    ask them to stop (should they wake, they stop at their next step and write nothing; the new lease
    generation fences them too) and end the attempt WORKER_LOST: False.
    """
    where = elsewhere.place(sup.plan, record)
    adir = sup.plan.paths.attempt_dir(record.n)
    if elsewhere.ranks_beat(sup.plan.run_dir, adir, wait_s=elsewhere.beat_window() + 2, fresh=True) is not False:
        raise LeaseLost(elsewhere.runs_elsewhere_message(job, record, where, "adopting it"))
    if elsewhere.ended(adir):
        return True
    sup.lease.check()
    elsewhere.request_stop(sup.plan.run_dir, record.n, f"taken over on {socket.gethostname()}: its ranks on "
                                                       f"{where.host} had fallen silent")
    sup.write_attempt(record.n, ended=time.time(), failure=Failure.WORKER_LOST.value, gained_checkpoint=0,
                      end_step=record.start_step,
                      message=f"ran on {where.host}, whose ranks fell silent without an end record; taken over on "
                              f"{socket.gethostname()} (should they wake, they stop at their next step without writing)")
    sup.on_event(f"attempt {record.n} ran on {where.host} and its ranks fell silent: ended WORKER_LOST")
    return False


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
    sup.kill(handle, grace_s=10.0)
    outcome = attempt_outcome(Path(handle.attempt_dir), sup.backend.poll(handle))
    failure = classify(outcome)
    sup.write_attempt(record.n, ended=time.time(), exit_code=outcome.returncode, failure=failure.value,
                      gained_checkpoint=0, end_step=record.start_step,
                      message="an older attempt left open by a dead supervisor; ended")

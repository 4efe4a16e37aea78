"""Acting on jobs: take one (its lease), supervise it here, hand it to a background supervisor, cancel it.

Every path to acting on a job goes through its lease (:mod:`orchestrator.store.lease`):
``submit`` and ``resume`` take it atomically (two ``resume`` at once: exactly one wins,
the other is told who supervises); ``--detach`` and a closed terminal hand it to a
background supervisor with the holder's token; ``cancel`` asks the holder through a
request file and acts itself only when nobody holds the lease.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from ..backends import get_backend
from ..backends.processes import job_processes, kill_job_processes, pid_alive, spawn_supervisor
from ..errors import JobError
from ..states import Failure, JobState
from ..store import requests
from ..store.lease import Lease, LeaseBusy, read_lease
from ..store.ledger import Job, Ledger
from ..store.paths import orchestrate_home
from .adopt import attempt_handle
from .jobs import load_plan
from .notify import notify_end
from .supervisor import Supervisor

TAKEOVER_WAIT_S = 60.0


def take_job(job: Job, handoff_token: str | None = None) -> Lease:
    """Take the job's lease and keep it alive from a thread; :class:`LeaseBusy` names the holder."""
    return Lease.acquire(job.run_dir, handoff_token=handoff_token).keep_alive()


def check_resumable(job: Job) -> None:
    """``resume`` of a completed job is refused (its checkpoints stay where they are)."""
    if job.state is JobState.COMPLETED:
        raise JobError(f"{job.id} has already completed")


def supervise(ledger: Ledger, job: Job, lease: Lease, *, resume: bool = False, foreground: bool = True,
              install_signals: bool = True, on_event: Callable[[str], None] | None = None,
              on_hangup: Callable[[], None] | None = None) -> JobState | None:
    """Run the job's supervisor in this process while ``lease`` is held; ``None`` if it left the job to another."""
    plan = load_plan(job)
    home = orchestrate_home()

    def hand_off(token: str) -> int:
        return spawn_supervisor(job.id, home, Path(job.run_dir), resume=True, handoff_token=token)

    sup = Supervisor(plan, ledger, get_backend(plan.backend), lease, on_event=on_event, hand_off=hand_off,
                     process_alive=pid_alive)
    if install_signals:
        install_signal_handlers(sup, foreground=foreground, log=Path(job.run_dir) / "supervisor.log",
                                on_hangup=on_hangup)
    from .queue import wait_turn

    if not wait_turn(sup, ledger.get(job.id)):   # issue 19: a job of a local sweep waits QUEUED for its slot
        ended = ledger.get(job.id)
        return ended.state if ended.state.is_terminal else None
    if not resume:
        return sup.run()
    # An explicit resume overrides a cancel asked for before it (never one asked for after).
    requests.clear(job.run_dir, requests.CANCEL, older_than=lease.record.acquired)
    return sup.run(adopt=True, fresh_budget=job.state.is_terminal)


def install_signal_handlers(sup: Supervisor, *, foreground: bool, log: Path,
                            on_hangup: Callable[[], None] | None = None) -> None:
    """Ctrl-C cancels (saying so first). SIGHUP (a closed terminal) hands a foreground job to a background
    supervisor and never cancels. SIGTERM cancels a foreground job; a background supervisor given SIGTERM
    stops supervising and leaves the job running."""
    def on_int(signum, frame):
        print(f"\nCtrl-C: cancelling job {sup.plan.job_id} and every process of it ...", file=sys.stderr, flush=True)
        sup.request_cancel("cancelled with Ctrl-C")

    def on_term(signum, frame):
        if foreground:
            sup.request_cancel("cancelled: the supervisor got SIGTERM")
        else:
            sup.request_stop("the background supervisor got SIGTERM")

    def on_hup(signum, frame):
        # The terminal is gone: from now on any write to it fails. Send output to the job's log first.
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        if on_hangup is not None:
            on_hangup()
        sup.request_hand_off()

    signal.signal(signal.SIGINT, on_int)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_hup if foreground else signal.SIG_IGN)


def detach(job: Job, lease: Lease, *, resume: bool) -> int:
    """Hand the job (and ``lease``) to a background supervisor; return its PID once it holds the job."""
    pid = spawn_supervisor(job.id, orchestrate_home(), Path(job.run_dir), resume=resume, handoff_token=lease.token)
    end = time.monotonic() + TAKEOVER_WAIT_S
    while time.monotonic() < end:
        if lease.superseded() is not None:
            lease.stop()
            return pid
        if not pid_alive(pid):
            break
        time.sleep(0.05)
    lease.release()
    raise JobError(f"{job.id}: the background supervisor (pid {pid}) did not take the job over; see "
                   f"{Path(job.run_dir) / 'supervisor.log'}")


def cancel(ledger: Ledger, job: Job, timeout_s: float = 90.0) -> list[int]:
    """End the job, its supervisor and every process of it; return PIDs left (none, normally).

    A live supervisor is asked (a request file it acts on at its next poll); only when nobody
    holds the job's lease does ``cancel`` take the lease and act itself.
    """
    if not job.state.is_terminal:
        requests.make_request(job.run_dir, requests.CANCEL)
    deadline = time.monotonic() + timeout_s
    while True:
        holder = read_lease(job.run_dir)
        job = ledger.get(job.id)
        if job.state.is_terminal and (holder is None or not holder.alive()):
            break
        if holder is None or not holder.alive():
            try:
                _cancel_here(ledger, job)
                break
            except LeaseBusy:
                pass  # a supervisor started just now: it sees the request
        if time.monotonic() > deadline:
            raise JobError(f"{job.id}: its supervisor ({holder.describe()}) did not act on the cancel request "
                           f"within {timeout_s:.0f} s; it is still {job.state.value}")
        time.sleep(0.2)
    if not job_processes(job.id):
        return []
    try:  # orphans of an ended job (nobody holds it): end them under the lease
        lease = Lease.acquire(job.run_dir)
    except LeaseBusy:
        return [p.pid for p in job_processes(job.id)]
    try:
        return kill_job_processes(job.id, grace_s=10.0)
    finally:
        lease.release()


def _cancel_here(ledger: Ledger, job: Job) -> None:
    """Nobody supervises the job: take its lease, end its open attempts and processes, mark it CANCELLED."""
    lease = Lease.acquire(job.run_dir)
    try:
        plan = load_plan(job)
        if plan.backend == "slurm":   # its allocation waits in the queue (or is gone): scancel it
            from .remote import cancel_unsupervised

            if not cancel_unsupervised(job):
                raise JobError(f"{job.id}: SLURM job {job.scheduler_job_id} is still in the queue after scancel")
            backend = None
        else:
            backend = get_backend(plan.backend)
        sup = Supervisor(plan, ledger, backend, lease)
        for record in [a for a in job.attempts if a.is_open]:
            handle = attempt_handle(sup, record) if backend is not None else None
            if handle is not None:
                sup.kill(handle, grace_s=10.0)
            sup.write_attempt(record.n, ended=time.time(), failure=Failure.CANCELLED.value, gained_checkpoint=0)
        lease.check()
        kill_job_processes(job.id, grace_s=10.0)
        if not ledger.get(job.id).state.is_terminal:
            sup.write_job(state=JobState.CANCELLED, message="cancelled by the user", supervisor_pid=None)
            notify_end(sup.plan, JobState.CANCELLED)   # issue 19: launch.notify, if it asks for CANCELLED
        requests.clear(job.run_dir, requests.CANCEL)
    finally:
        lease.release()

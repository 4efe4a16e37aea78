"""Acting on jobs: take one (its lease), supervise it here, hand it to a background supervisor, cancel it.

Every path to acting on a job goes through its lease (:mod:`orchestrator.store.lease`):
``submit`` and ``resume`` take it atomically (two ``resume`` at once: exactly one wins,
the other is told who supervises); ``--detach`` and a closed terminal hand it to a
background supervisor with the holder's token; ``cancel`` asks the holder through a
request file and acts itself only when nobody holds the lease. Whoever holds the lease
keeps it alive from a thread for as long as it acts (kill graces included).

Across hosts (login nodes sharing the home) a host acts only on what it can see: it probes and
signals the processes of its own process table alone. ``resume`` of a job whose attempt still
trains on another host refuses, naming that host; ``cancel`` of one stops it through the run
directory (a stop request its ranks honour at their next step) and waits for the ranks' own end
record; nothing is started while another attempt's ranks beat, and nothing is reported CANCELLED
while they do (:mod:`.elsewhere`).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from ..backends import get_backend
from ..backends.processes import attempt_root, job_processes, kill_job_processes, pid_alive, spawn_supervisor
from ..errors import JobError
from ..states import Failure, JobState
from ..store import requests
from ..store.lease import Lease, LeaseBusy, LeaseLost, hold, judge_holder, lease_duration
from ..store.ledger import Job, Ledger
from ..store.paths import orchestrate_home
from . import elsewhere
from .adopt import attempt_handle
from .jobs import load_plan
from .notify import notify_end
from .supervisor import Supervisor

TAKEOVER_WAIT_S = 60.0
WATCH_MARGIN_S = 2.0     # watch a little longer than the window: one poll's worth of slack


def watch_s() -> float:
    """How long an acting command may watch a lease or a beat it knows nothing about yet."""
    return max(lease_duration(), elsewhere.beat_window()) + WATCH_MARGIN_S


def running_here(job: Job) -> tuple[int, ...]:
    """Open attempts of ``job`` with live processes in this host's process table (a taker continues them)."""
    if job.backend != "local":
        return ()
    return tuple(a.n for a in job.attempts if a.is_open and attempt_root(job.id, a.n) is not None)


def take_job(job: Job, handoff_token: str | None = None, wait_s: float = 0.0) -> Lease:
    """Take the job's lease and keep it alive from a thread; :class:`LeaseBusy` names the holder.

    The attempts still running here are continued by the new generation (their ranks stay unfenced).
    """
    return Lease.acquire(job.run_dir, handoff_token=handoff_token, wait_s=wait_s,
                         continues=running_here(job)).keep_alive()


def take_over(job: Job) -> Lease:
    """``resume``: take a job whose supervisor is gone; :class:`LeaseBusy` if somebody holds it.

    A lease this host has not watched yet is watched until a renewal is seen (held) or none for its
    duration (gone). Refuses (:class:`JobError`, naming the host and what to run there) while the
    job's open attempt runs on another host and its ranks beat: that host alone can supervise it,
    and another attempt started beside it would train the job twice.
    """
    holder, alive = judge_holder(job.run_dir, wait_s=watch_s(), fresh=True)
    if holder is not None and alive is not False:
        raise LeaseBusy(holder)
    if job.backend == "local":
        plan = load_plan(job)
        for record in [a for a in job.attempts if a.is_open]:
            where = elsewhere.place(plan, record)
            if not where.here and elsewhere.ranks_beat(job.run_dir, plan.paths.attempt_dir(record.n),
                                                       wait_s=watch_s(), fresh=True) is not False:
                raise JobError(elsewhere.runs_elsewhere_message(job, record, where, "resume"))
    return take_job(job)


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
    holds the job's lease (released, its process here gone, or no renewal seen on this host's
    clock for its duration) does ``cancel`` take the lease and act itself. It returns only once
    no rank of the job beats any more, wherever it ran.
    """
    if not job.state.is_terminal:
        requests.make_request(job.run_dir, requests.CANCEL)
    deadline = time.monotonic() + timeout_s + watch_s()
    while True:
        job = ledger.get(job.id)
        holder, alive = judge_holder(job.run_dir)
        if alive is False and job.state.is_terminal:
            break
        if alive is False:
            try:
                _cancel_here(ledger, job, timeout_s)
                break
            except (LeaseBusy, LeaseLost):
                pass  # a supervisor started just now (it sees the request), or the lease is being replaced
        if time.monotonic() > deadline:
            who = holder.describe() if holder is not None else "none yet"
            raise JobError(f"{job.id}: its supervisor ({who}) did not act on the cancel request within "
                           f"{timeout_s:.0f} s; it is still {job.state.value}")
        time.sleep(0.2)
    _ranks_ended_elsewhere(ledger.get(job.id), timeout_s)
    if not job_processes(job.id):
        return []
    try:  # orphans of an ended job (nobody holds it): end them under the lease
        lease = hold(job.run_dir)
    except (LeaseBusy, LeaseLost):
        return [p.pid for p in job_processes(job.id)]
    with lease:
        lease.check()
        return kill_job_processes(job.id, grace_s=10.0)


def _ranks_ended_elsewhere(job: Job, timeout_s: float) -> None:
    """Never CANCELLED while ranks beat: wait until the ranks of the job's attempts on other hosts end."""
    if job.backend != "local" or not job.attempts:
        return
    plan = load_plan(job)
    for record in job.attempts[-1:]:
        where = elsewhere.place(plan, record)
        adir = plan.paths.attempt_dir(record.n)
        if not where.here and not elsewhere.wait_until_stopped(job.run_dir, adir, timeout_s):
            raise JobError(f"{job.id} is recorded {job.state.value}, but the ranks of attempt {record.n} on "
                           f"{where.host} still beat after {timeout_s:.0f} s; on {where.host} run: orchestrate cancel "
                           f"{job.id}")


def _cancel_here(ledger: Ledger, job: Job, timeout_s: float = 90.0) -> None:
    """Nobody supervises the job: take its lease, end its open attempts and processes, mark it CANCELLED.

    An attempt of this host is ended by signals; one of another host through the run directory (a stop
    request its ranks honour at their next step), and only once its ranks have ended or fallen silent is
    it recorded CANCELLED.
    """
    with hold(job.run_dir) as lease:
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
            where = elsewhere.place(plan, record) if backend is not None else None
            if where is not None and not where.here:
                _stop_elsewhere(sup, job, record, where, timeout_s)
            else:
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


def _stop_elsewhere(sup: Supervisor, job: Job, record, where: elsewhere.Place, timeout_s: float) -> None:
    """Stop an attempt of another host through the run directory and wait until its ranks have stopped."""
    adir = sup.plan.paths.attempt_dir(record.n)
    elsewhere.request_stop(job.run_dir, record.n, f"cancelled from {socket.gethostname()} (orchestrate cancel)")
    sup.on_event(f"attempt {record.n} runs on {where.host}: asked its ranks to stop at their next step")
    if not elsewhere.wait_until_stopped(job.run_dir, adir, timeout_s):
        raise JobError(f"{job.id}: the ranks of attempt {record.n} on {where.host} still beat {timeout_s:.0f} s after "
                       f"the stop request; not CANCELLED; on {where.host} run: orchestrate cancel {job.id}")

"""Acting on existing jobs: run a supervisor for one, cancel one, take one over again."""
from __future__ import annotations

import os
import signal
import time
from typing import Callable

from ..backends import AttemptHandle, get_backend
from ..backends.processes import job_processes, kill_job_processes, supervisor_alive
from ..errors import JobError
from ..states import Failure, JobState
from ..store.ledger import Job, Ledger
from .jobs import load_plan
from .supervisor import Supervisor


def supervise(ledger: Ledger, job: Job, *, resume: bool = False, install_signals: bool = True,
              on_event: Callable[[str], None] | None = None) -> JobState:
    """Run the job's supervisor in this process until the job ends."""
    plan = load_plan(job)
    backend = get_backend(plan.backend)
    sup = Supervisor(plan, ledger, backend, on_event=on_event)
    if install_signals:
        sup.install_signal_handlers()
    if not resume:
        return sup.run()
    handle, fresh = _takeover(ledger, job, backend)
    return sup.run(reattach=handle, fresh_budget=fresh)


def check_resumable(job: Job) -> None:
    if job.state is JobState.COMPLETED:
        raise JobError(f"{job.id} has already completed")
    if supervisor_alive(job.supervisor_pid, job.heartbeat):
        raise JobError(f"{job.id} is already supervised by pid {job.supervisor_pid}; nothing to do")


def _takeover(ledger: Ledger, job: Job, backend) -> tuple[AttemptHandle | None, bool]:
    """The open attempt to follow again (running or not), and whether the budget starts afresh."""
    check_resumable(job)
    last = job.attempts[-1] if job.attempts else None
    if last is not None and last.ended is None:
        # Follow the open attempt again: if it is still running we wait for it, if it
        # ended meanwhile its exit record and status files say how (no second copy starts).
        handle = AttemptHandle(job_id=job.id, attempt=last.n, pid=last.pid or 0,
                               attempt_dir=str(load_plan(job).paths.attempt_dir(last.n)))
        return handle, False
    # A job that had ended (FAILED/CANCELLED) gets a fresh retry budget when resumed by hand.
    return None, job.state.is_terminal


def cancel(ledger: Ledger, job: Job, timeout_s: float = 60.0) -> list[int]:
    """End the job, its supervisor and every process of it; return PIDs left (none, normally)."""
    if supervisor_alive(job.supervisor_pid, job.heartbeat):
        try:
            os.kill(job.supervisor_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = ledger.get(job.id)
            if job.state.is_terminal and not supervisor_alive(job.supervisor_pid, job.heartbeat):
                break
            time.sleep(0.2)
    last = job.attempts[-1] if job.attempts else None
    if last is not None and last.ended is None and job.backend != "local":
        # No supervisor did it: end the scheduler's job too (scancel, and wait until it left the queue).
        plan = load_plan(job)
        handle = AttemptHandle(job_id=job.id, attempt=last.n, pid=last.pid or 0,
                               attempt_dir=str(plan.paths.attempt_dir(last.n)))
        left_remote = get_backend(job.backend).kill(handle, grace_s=10.0)
        if left_remote:
            return left_remote
    left = kill_job_processes(job.id, last.pid if last and last.ended is None and job.backend == "local"
                              else None, grace_s=10.0)
    job = ledger.get(job.id)
    if last is not None and last.ended is None:
        ledger.update_attempt(job.id, last.n, ended=time.time(), failure=Failure.CANCELLED.value,
                              gained_checkpoint=0)
    if not job.state.is_terminal:
        ledger.update_job(job.id, state=JobState.CANCELLED, message="cancelled by the user", supervisor_pid=None)
    return left or [p.pid for p in job_processes(job.id)]

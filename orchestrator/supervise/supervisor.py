"""The supervisor: one loop that owns a job from first attempt to final state.

Start an attempt, follow it (exit status, progress file, watchdog, cancel
requests), classify how it ended, ask the retry policy, and resume from the newest
*verified* checkpoint. The same loop serves every backend.

It acts only while it holds the job's lease (:mod:`orchestrator.store.lease`): every
state write carries the lease generation (the ledger refuses older ones) and every
signal is preceded by a check of the lease. A supervisor that lost the lease (a
successor took the job over, or it could not renew in time) stops at once and leaves
the job alone. Attempts are written ahead: recorded STARTING before the backend starts
them, so that whoever adopts the job finds every attempt (:mod:`.adopt`).
"""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Callable

from ..backends.base import AttemptHandle, Backend
from ..plan import LaunchPlan
from ..states import Failure, JobState
from ..store import requests
from ..store.goodput_read import keep_final_goodput
from ..store.lease import Lease, LeaseLost
from ..store.ledger import RUNNING, FencedOut, Ledger
from ..store.progress import ProgressFollower, read_heartbeat
from . import checkpoints, disk
from .classify import Outcome, classify, job_state_after
from .jobs import start_fenced
from .notify import notify_end
from .outcome import attempt_outcome, error_line
from .policy import PastAttempt, decide
from .watchdog import Watchdog

POLL_S = 0.25
HANDOFF_WAIT_S = 60.0


class Supervisor:
    """Runs one job to a terminal state while it holds ``lease``. ``clock``/``sleep`` are injectable for tests.

    ``hand_off``: starts a background supervisor that takes the lease with the given token and
    returns its PID (what SIGHUP of a foreground ``submit`` does, see :meth:`request_hand_off`).
    """

    def __init__(self, plan: LaunchPlan, ledger: Ledger, backend: Backend, lease: Lease, *,
                 on_event: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 hand_off: Callable[[str], int] | None = None, process_alive: Callable[[int], bool] | None = None):
        self.plan, self.ledger, self.backend, self.lease = plan, ledger, backend, lease
        self.on_event = on_event or (lambda msg: None)
        self.clock, self.sleep = clock, sleep
        self.hand_off, self.process_alive = hand_off, process_alive
        self.cancel_requested = False
        self.cancel_reason = "cancelled by the user"
        self.hand_off_requested = False
        self.stop_requested: str | None = None
        self.stop_decide: Callable[[], JobState | None] | None = None
        self._attempt_n: int | None = None
        self._current: AttemptHandle | None = None

    # -- requests from signals and from other processes ----------------------------------
    def request_cancel(self, reason: str) -> None:
        """Cancel the job at the next poll (a signal handler may call this)."""
        self.cancel_reason, self.cancel_requested = reason, True

    def request_hand_off(self) -> None:
        """Hand the job to a background supervisor at the next poll, leaving the attempt running."""
        self.hand_off_requested = True

    def request_stop(self, reason: str, decide: Callable[[], JobState | None] | None = None) -> None:
        """Stop supervising at the next poll and release the lease; the job keeps running.

        ``decide`` (asked at that poll) may say the job has ended meanwhile, e.g. CANCELLED when
        SLURM ends the allocation on a user's ``scancel``: that state is recorded first.
        """
        self.stop_requested, self.stop_decide = reason, decide

    def _poll_requests(self) -> None:
        if self.stop_requested:
            final = self.stop_decide() if self.stop_decide is not None else None
            if final is not None:
                self._end_open_attempt(final)
                self._finish(final, self.stop_requested)
            self.lease.release()
            raise LeaseLost(f"{self.stop_requested}; " + (f"job {final.value}" if final else
                            f"the job keeps running (orchestrate resume {self.plan.job_id} takes it over)"))
        if not self.cancel_requested and requests.pending(self.plan.run_dir, requests.CANCEL) is not None:
            self.request_cancel("cancelled by the user (orchestrate cancel)")
        if self.hand_off_requested and self.hand_off is not None:
            self.hand_off_requested = False
            self._hand_off()

    # -- fenced writes and signals ----------------------------------------------------------
    def write_job(self, **fields) -> None:
        """A fenced write of job columns."""
        self.lease.check()
        self.ledger.update_job(self.plan.job_id, fence=self.lease.gen, **fields)

    def write_attempt(self, n: int, **fields) -> None:
        """A fenced write of attempt ``n``'s columns."""
        self.lease.check()
        self.ledger.update_attempt(self.plan.job_id, n, fence=self.lease.gen, **fields)

    def _event(self, msg: str) -> None:
        self.write_job(message=msg)
        self.on_event(msg)

    def kill(self, handle: AttemptHandle, grace_s: float) -> None:
        """End the attempt's processes (after checking the lease)."""
        self.lease.check()
        left = self.backend.kill(handle, grace_s=grace_s)
        if left:
            self._event(f"WARNING: processes still alive after kill: {left}")

    # -- main loop -------------------------------------------------------------------------
    def run(self, adopt: bool = False, fresh_budget: bool = False) -> JobState | None:
        """Supervise until the job is COMPLETED, FAILED or CANCELLED; return that state.

        ``adopt``: the job had a supervisor before; handle every attempt it left open first
        (:func:`.adopt.adopt_open_attempts`) and follow the one still running, if any.
        ``None``: this supervisor lost the lease (or handed the job over) and left the job alone.
        """
        try:
            return self._run(adopt, fresh_budget)
        except (LeaseLost, FencedOut) as exc:
            getattr(self.backend, "discard_spares", lambda job_id: None)(self.plan.job_id)   # backends/spare.py
            self.on_event(f"this supervisor no longer holds the job ({exc}); leaving it alone")
            return None
        except (OSError, sqlite3.OperationalError) as exc:
            if not disk.is_disk_full(exc):
                raise
            return self._own_disk_full(exc)

    def _own_disk_full(self, exc: BaseException) -> JobState | None:
        """The supervisor's own write found the disk full: stop the job, say where and how full."""
        where = getattr(exc, "filename", None) or str(self.ledger.path)
        message = f"DISK_FULL (the supervisor's own write: {exc}); " + disk.disk_full_message(
            self.plan.output_dir, where=str(Path(where).parent))
        self.on_event(message)
        try:
            if self._current is not None:
                self.kill(self._current, grace_s=10.0)
            return self._finish(JobState.FAILED, message)
        except (LeaseLost, FencedOut):
            return None
        except (OSError, sqlite3.OperationalError):
            return JobState.FAILED  # nothing more can be written; status shows the supervisor gone

    def _run(self, adopt: bool, fresh_budget: bool) -> JobState:
        from .adopt import adopt_open_attempts

        job_id = self.plan.job_id
        self.write_job(supervisor_pid=os.getpid())
        reattach = adopt_open_attempts(self, self.ledger.get(job_id)) if adopt else None
        job = self.ledger.get(job_id)
        history = [] if fresh_budget else [
            PastAttempt(Failure(a.failure), bool(a.gained_checkpoint)) for a in job.attempts if a.failure]
        attempt = max((a.n for a in job.attempts), default=0) + (0 if reattach else 1)
        last_failure = Failure(job.attempts[-1].failure) if job.attempts and job.attempts[-1].failure else None
        while True:
            self._poll_requests()
            if reattach is not None:
                handle, start_step = reattach, self._attempt_start_step(attempt)
                mark = checkpoints.progress_mark(self.plan)
                self._event(f"following attempt {attempt} again (pid {handle.pid or handle.external_id})")
                reattach = None
            else:
                if self.cancel_requested:
                    return self._finish(JobState.CANCELLED, f"{self.cancel_reason} before the attempt started")
                resume_from, stop_reason = self._resume_point()
                if stop_reason:
                    return self._finish(JobState.FAILED, stop_reason)
                if self._relocated(last_failure):
                    return None
                mark, start_step = checkpoints.progress_mark(self.plan), checkpoints.verified_step(self.plan.output_dir) or 0
                handle = self._start(attempt, resume_from, start_step)
                self._event(f"attempt {attempt} started" + (f", resuming from {resume_from}" if resume_from else ""))
            self._current, self._attempt_n = handle, attempt
            outcome, end_step = self._follow(handle, attempt)
            self._current = None
            failure = classify(outcome)
            final_problem, final_note = self._check_final_model(handle) if failure is Failure.COMPLETED else (None, None)
            gained = checkpoints.progress_mark(self.plan) > mark   # a later stage of a script counts too
            history.append(PastAttempt(failure, gained))
            decision = decide(failure, history, self.plan.retry)
            detail = error_line(outcome)
            if failure is Failure.DISK_FULL:
                detail = self._disk_full(detail)
            facts_of = getattr(self.backend, "attempt_facts", None)   # e.g. the SLURM step id, known by now
            self.write_attempt(attempt, ended=time.time(), exit_code=outcome.returncode, failure=failure.value,
                               end_step=end_step, gained_checkpoint=int(gained), message=detail or None,
                               **({"external_id": facts_of(handle).get("external_id")} if facts_of else {}))
            state = job_state_after(failure, decision.retry)
            self._event(f"attempt {attempt} ended: {failure.value}" + (f" ({detail})" if detail else "")
                        + f"; {decision.reason}")
            if final_problem:
                return self._finish(JobState.FAILED, f"training completed, but {final_problem}")
            if state.is_terminal:
                message = decision.reason if state is not JobState.COMPLETED else (final_note or "completed")
                if state is JobState.CANCELLED:
                    message = self.cancel_reason
                elif failure is Failure.DISK_FULL:
                    message = f"DISK_FULL: {detail}"
                return self._finish(state, message)
            self.write_job(state=JobState.RESUMING)
            self._wait(decision.wait_s)
            attempt += 1
            last_failure = failure

    def _start(self, attempt: int, resume_from: str | None, start_step: int) -> AttemptHandle:
        """Write the attempt ahead (STARTING), start it, then record who runs it (RUNNING)."""
        job_id = self.plan.job_id
        self.lease.check()
        self.ledger.start_attempt(job_id, attempt, resumed_from=resume_from, start_step=start_step,
                                  fence=self.lease.gen)
        handle = start_fenced(self.backend, self.plan, self.lease, attempt, resume_from)
        self.write_attempt(attempt, **{"status": RUNNING, "pid": handle.pid or None, "pid_start": handle.pid_start,
                                       "host": handle.host, "external_id": handle.external_id,
                                       "world_size": self.plan.world_size, **self._facts(handle, attempt)})
        self.write_job(state=JobState.RUNNING)
        return handle

    def _facts(self, handle: AttemptHandle, attempt: int) -> dict:
        """Where the attempt runs (a scheduler's allocation and nodes), and whether it restarted in place."""
        facts_of = getattr(self.backend, "attempt_facts", None)
        if facts_of is None:
            return {}
        facts = facts_of(handle)
        if not any(a.n < attempt for a in self.ledger.get(self.plan.job_id).attempts):
            facts.pop("in_place", None)   # the first attempt neither restarted in place nor went through the queue
        return facts

    def _relocated(self, last_failure: Failure | None) -> bool:
        """Ask the backend where the next attempt runs; if in a new allocation, hand the job over to it."""
        place = getattr(self.backend, "placement", None)
        if place is None:
            return False
        where = place(self.plan, last_failure)
        if getattr(where, "resize", None):
            self._resize(where.resize)
        if not where.relocate:
            return False
        self._event(f"continuing in a new allocation: {where.relocate}")
        self.write_job(state=JobState.RESUMING)
        self.lease.release()   # the next allocation's supervisor takes it at once
        done, new_allocation = self.backend.relocate(self.plan, where)
        if new_allocation:   # the lease is released: nothing else writes until the new allocation runs
            self.ledger.update_job(self.plan.job_id, scheduler_job_id=new_allocation, message=done)
        self.on_event(done)
        return True

    def _check_final_model(self, handle: AttemptHandle) -> tuple[str | None, str | None]:
        """``(why the job fails, the COMPLETED message)`` from the final-model check (:mod:`.final_model`)."""
        from .final_model import verify_final_model

        check = verify_final_model(self.plan.slurm.get("python") or self.plan.python, handle.attempt_dir,
                                   env=dict(self.plan.env))
        if check is None:
            return None, None
        if check.verified:
            self.write_job(final_model=check.folder)
        self._event(check.event)
        return check.failure, check.completed

    def _resize(self, nnodes: int) -> None:
        """Go on with ``nnodes`` nodes: the same global batch, more gradient accumulation (issue 12)."""
        from ..plan.resize import resize_plan
        from .jobs import replace_plan

        job = self.ledger.get(self.plan.job_id)
        self.plan, said = resize_plan(self.plan, nnodes, self.plan.nproc_per_node)
        replace_plan(job, self.plan, max((a.n for a in job.attempts), default=0), fence=self.lease.check)
        for line in said:
            self._event(line)

    def _end_open_attempt(self, failure_state: JobState) -> None:
        if self._attempt_n is not None and self._current is not None:
            self.write_attempt(self._attempt_n, ended=time.time(), failure=Failure(failure_state.value).value
                               if failure_state.value in Failure.__members__ else Failure.CANCELLED.value,
                               gained_checkpoint=0)

    def _finish(self, state: JobState, message: str) -> JobState:
        # A next attempt started ahead (backends/spare.py) goes first: whoever sees the final state finds no process.
        getattr(self.backend, "discard_spares", lambda job_id: None)(self.plan.job_id)
        self.write_job(state=state, message=message, supervisor_pid=None)
        keep_final_goodput(self.ledger, self.plan.job_id)   # issue 20: the final account, for every view
        if state is JobState.CANCELLED:
            requests.clear(self.plan.run_dir, requests.CANCEL)
        self.on_event(f"job {state.value}: {message}")
        notify_end(self.plan, state, self.on_event)   # issue 19: launch.notify, in a process of its own
        return state

    def _wait(self, seconds: float) -> None:
        end = self.clock() + seconds
        while self.clock() < end:
            self._poll_requests()
            if self.cancel_requested:
                return
            self.lease.check()
            self.sleep(min(POLL_S, max(0.0, end - self.clock())))

    def _hand_off(self) -> None:
        """Start a background supervisor with this lease's token and wait until it holds the job.

        Raises LeaseLost once it does (this supervisor then leaves, the attempt keeps running);
        returns if it never took over (this supervisor carries on).
        """
        pid = self.hand_off(self.lease.token)
        self._event(f"handing the job to a background supervisor (pid {pid}); the attempt keeps running")
        end = self.clock() + HANDOFF_WAIT_S
        while self.clock() < end:
            newer = self.lease.superseded()
            if newer is not None:
                raise LeaseLost(f"handed over to {newer.describe()}")
            if self.process_alive is not None and not self.process_alive(pid):
                break
            self.sleep(0.1)
        self._event(f"the background supervisor (pid {pid}) did not take the job over; this one carries on "
                    f"(see {Path(self.plan.run_dir) / 'supervisor.log'})")

    def _disk_full(self, detail: str) -> str:
        return checkpoints.disk_full_detail(self.plan.output_dir, detail, fence=self.lease.check)

    def _resume_point(self) -> tuple[str | None, str | None]:
        """``(checkpoint to resume from or None, reason to stop instead)``."""
        return checkpoints.resume_point(self.plan, self.ledger.get(self.plan.job_id).attempts, self._event,
                                        fence=self.lease.check)

    def _attempt_start_step(self, attempt: int) -> int:
        job = self.ledger.get(self.plan.job_id)
        for a in job.attempts:
            if a.n == attempt:
                return a.start_step or 0
        return 0

    # -- following one attempt ----------------------------------------------------
    def _follow(self, handle: AttemptHandle, attempt: int) -> tuple[Outcome, int]:
        earlier = ProgressFollower(self.plan.paths.progress)
        earlier.poll()   # how long the saves of earlier attempts took
        watchdog = Watchdog(self.plan.watchdog, self.clock(), {"saving": list(earlier.state.save_s)})
        follower = ProgressFollower(self.plan.paths.progress, attempt)
        stalled = cancelled = False
        last_step = None
        queued = getattr(self.backend, "queued", None)  # SLURM: time in the queue is not start-up time
        while True:
            rc = self.backend.poll(handle)
            if queued is not None and rc is None and watchdog.steps.last is None and queued(handle):
                watchdog.queued(self.clock())
            for rec in follower.poll():
                if rec.get("attempt") == attempt and rec.get("event") in ("log", "checkpoint", "start"):
                    watchdog.progressed(self.clock())
            watchdog.beat(read_heartbeat(Path(handle.attempt_dir)), self.clock())
            if follower.state.step != last_step:
                last_step = follower.state.step
                self._record_progress(follower)
            if rc is not None:
                break
            self._poll_requests()
            if self.cancel_requested:
                cancelled = True
                self._event(f"{self.cancel_reason}: ending attempt {attempt} and every process of it")
                self.kill(handle, grace_s=10.0)
                break
            why = watchdog.stalled(self.clock())
            if why:
                stalled = True
                self._event(f"attempt {attempt}: {why}; ending it (STALLED)")
                self.kill(handle, grace_s=5.0)
                break
            self.lease.check()
            self.sleep(POLL_S)
        rc = self.backend.poll(handle) if rc is None else rc
        if not (stalled or cancelled):
            # Ranks outlive a dead torchrun agent (they run in sessions of their own) and
            # would keep writing checkpoints beside the next attempt: end whatever is left (at once when
            # the agent was killed: their graceful stop could not finish a save in any grace worth waiting).
            self.kill(handle, grace_s=0.0 if rc is not None and rc < 0 else 3.0)
        follower.poll()
        self._record_progress(follower)
        return self._outcome(handle, rc, stalled, cancelled), follower.state.step

    def _record_progress(self, follower: ProgressFollower) -> None:
        """Step, max_steps and distributed mode into the ledger; unknown values never erase known ones."""
        st = follower.state
        fields = {"step": st.step}
        if st.max_steps:
            fields["max_steps"] = st.max_steps
        if st.distributed_type:
            fields["distributed_type"] = st.distributed_type
        self.write_job(**fields)

    def _outcome(self, handle: AttemptHandle, rc: int | None, stalled: bool, cancelled: bool) -> Outcome:
        return attempt_outcome(Path(handle.attempt_dir), rc, stalled=stalled, cancelled=cancelled,
                               output_dir=self.plan.output_dir)

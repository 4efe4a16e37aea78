"""The supervisor: one loop that owns a job from first attempt to final state.

Start an attempt, follow it (exit status, progress file, watchdog, cancel
requests), classify how it ended, ask the retry policy, and resume from the newest
*verified* checkpoint. The same loop serves every backend.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

from ..backends.base import AttemptHandle, Backend
from ..plan import LaunchPlan
from ..states import Failure, JobState
from ..store.ledger import Ledger
from ..store.logs import earliest_error_record
from ..store.progress import ProgressFollower
from ..worker import channel
from ..worker.checkpoints import list_checkpoints, newest_complete
from .classify import Outcome, classify, job_state_after
from .policy import PastAttempt, decide
from .watchdog import StallClock

POLL_S = 0.25
HEARTBEAT_S = 2.0


class Supervisor:
    """Runs one job to a terminal state. ``clock``/``sleep`` are injectable for tests."""

    def __init__(self, plan: LaunchPlan, ledger: Ledger, backend: Backend, *,
                 on_event: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.plan, self.ledger, self.backend = plan, ledger, backend
        self.on_event = on_event or (lambda msg: None)
        self.clock, self.sleep = clock, sleep
        self.cancel_requested = False
        self._last_beat = 0.0

    # -- signals -------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT/SIGHUP to the supervisor mean: cancel the job."""
        def handler(signum, frame):
            self.cancel_requested = True
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, handler)

    def _event(self, msg: str) -> None:
        self.ledger.update_job(self.plan.job_id, message=msg)
        self.on_event(msg)

    # -- main loop -------------------------------------------------------------
    def run(self, reattach: AttemptHandle | None = None, fresh_budget: bool = False) -> JobState:
        """Supervise until the job is COMPLETED, FAILED or CANCELLED; return that state."""
        job_id = self.plan.job_id
        self.ledger.update_job(job_id, supervisor_pid=os.getpid(), heartbeat=time.time())
        job = self.ledger.get(job_id)
        history = [] if fresh_budget else [
            PastAttempt(Failure(a.failure), bool(a.gained_checkpoint))
            for a in job.attempts if a.failure]
        attempt = len(job.attempts) + (0 if reattach else 1)
        while True:
            if reattach is not None:
                handle, start_step, before = reattach, self._attempt_start_step(attempt), self._verified_step()
                self._event(f"reattached to attempt {attempt} (pid {handle.pid})")
                reattach = None
            else:
                if self.cancel_requested:
                    return self._finish(JobState.CANCELLED, "cancelled before the attempt started")
                resume_from, stop_reason = self._resume_point()
                if stop_reason:
                    return self._finish(JobState.FAILED, stop_reason)
                before = self._verified_step()
                start_step = before or 0
                handle = self.backend.start(self.plan, attempt, resume_from)
                self.ledger.start_attempt(job_id, attempt, pid=handle.pid, resumed_from=resume_from,
                                          start_step=start_step)
                self.ledger.update_job(job_id, state=JobState.RUNNING)
                self._event(f"attempt {attempt} started" + (f", resuming from {resume_from}" if resume_from else ""))
            outcome, end_step = self._follow(handle, attempt)
            failure = classify(outcome)
            gained = (self._verified_step() or 0) > (before or 0)
            history.append(PastAttempt(failure, gained))
            decision = decide(failure, history, self.plan.retry)
            detail = _error_line(outcome)
            self.ledger.update_attempt(
                job_id, attempt, ended=time.time(), exit_code=outcome.returncode, failure=failure.value,
                end_step=end_step, gained_checkpoint=int(gained), message=detail or None)
            state = job_state_after(failure, decision.retry)
            self._event(f"attempt {attempt} ended: {failure.value}" + (f" ({detail})" if detail else "")
                        + f"; {decision.reason}")
            if state.is_terminal:
                return self._finish(state, decision.reason if state is not JobState.COMPLETED else "completed")
            self.ledger.update_job(job_id, state=JobState.RESUMING)
            self._wait(decision.wait_s)
            attempt += 1

    def _finish(self, state: JobState, message: str) -> JobState:
        self.ledger.update_job(self.plan.job_id, state=state, message=message, supervisor_pid=None)
        self.on_event(f"job {state.value}: {message}")
        return state

    def _wait(self, seconds: float) -> None:
        end = self.clock() + seconds
        while not self.cancel_requested and self.clock() < end:
            self._beat()
            self.sleep(min(POLL_S, max(0.0, end - self.clock())))

    def _beat(self) -> None:
        now = time.time()
        if now - self._last_beat >= HEARTBEAT_S:
            self.ledger.update_job(self.plan.job_id, heartbeat=now, supervisor_pid=os.getpid())
            self._last_beat = now

    # -- checkpoints -------------------------------------------------------------
    def _verified_step(self) -> int | None:
        good, _ = newest_complete(self.plan.output_dir)
        return good.step if good else None

    def _resume_point(self) -> tuple[str | None, str | None]:
        """``(checkpoint to resume from or None, reason to stop instead)``."""
        good, skipped = newest_complete(self.plan.output_dir)
        for check in skipped:
            self._event(f"skipping {check.path.name}: {check.reason}")
        if good:
            return str(good.path), None
        given = self.plan.worker_config.get("resume_from_checkpoint")
        if isinstance(given, str) and given.lower() not in ("", "true", "false", "none"):
            return given, None  # the user's own starting point (e.g. a checkpoint of a manual run)
        if list_checkpoints(self.plan.output_dir) and not self.plan.retry.restart_from_scratch:
            return None, (f"checkpoints exist in {self.plan.output_dir} but none is complete; not starting "
                          "over silently (set launch.retry.restart_from_scratch: true to allow it)")
        return None, None

    def _attempt_start_step(self, attempt: int) -> int:
        job = self.ledger.get(self.plan.job_id)
        for a in job.attempts:
            if a.n == attempt:
                return a.start_step or 0
        return 0

    # -- following one attempt ----------------------------------------------------
    def _follow(self, handle: AttemptHandle, attempt: int) -> tuple[Outcome, int]:
        follower = ProgressFollower(self.plan.paths.progress, attempt)
        wd = self.plan.watchdog
        stall = StallClock(wd.stall_factor, wd.stall_floor_s, wd.startup_timeout_s, self.clock())
        stalled = cancelled = False
        last_step = None
        queued = getattr(self.backend, "queued", None)  # SLURM: time in the queue is not start-up time
        while True:
            rc = self.backend.poll(handle)
            if queued is not None and rc is None and stall.last is None and queued(handle):
                stall.started = self.clock()
            for rec in follower.poll():
                if rec.get("attempt") == attempt:
                    stall.progressed(self.clock())
            if follower.state.step != last_step:
                last_step = follower.state.step
                self._record_progress(follower)
            if rc is not None:
                break
            if self.cancel_requested:
                cancelled = True
                self._event(f"cancelling attempt {attempt}")
                self._kill(handle, grace_s=10.0)
                break
            if stall.stalled(self.clock()):
                stalled = True
                self._event(f"attempt {attempt}: no progress for {stall.limit_s():.0f} s; ending it (STALLED)")
                self._kill(handle, grace_s=5.0)
                break
            self._beat()
            self.sleep(POLL_S)
        rc = self.backend.poll(handle) if rc is None else rc
        if not (stalled or cancelled):
            # Ranks outlive a dead torchrun agent (they run in sessions of their own) and
            # would keep writing checkpoints beside the next attempt: end whatever is left.
            self._kill(handle, grace_s=3.0)
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
        self.ledger.update_job(self.plan.job_id, **fields)

    def _kill(self, handle: AttemptHandle, grace_s: float) -> None:
        left = self.backend.kill(handle, grace_s=grace_s)
        if left:
            self._event(f"WARNING: processes still alive after kill: {left}")

    def _outcome(self, handle: AttemptHandle, rc: int | None, stalled: bool, cancelled: bool) -> Outcome:
        adir = Path(handle.attempt_dir)
        status = channel.read_json(adir / channel.STATUS_FILE) or {}
        return Outcome(returncode=rc, agent=channel.read_json(adir / channel.AGENT_RECORD_FILE),
                       worker_state=status.get("state"), error=_first_error_record(adir),
                       stalled=stalled, cancelled=cancelled)


def _first_error_record(attempt_dir: Path) -> dict | None:
    found = earliest_error_record(attempt_dir)
    return found[0] if found else None


def _error_line(o: Outcome) -> str:
    for rank, f in sorted(((o.agent or {}).get("failures") or {}).items()):
        if f.get("signal") and f["signal"] != "SIGTERM":  # SIGTERM: torchrun ending the survivors
            return f"rank {rank} killed by {f['signal']}"
    if o.error:
        return f"rank {o.error.get('rank')}: {o.error.get('type')}: {str(o.error.get('message', ''))[:300]}"
    if o.agent is None and o.returncode not in (0, None):
        return f"torchrun agent ended with status {o.returncode} and left no record"
    return ""

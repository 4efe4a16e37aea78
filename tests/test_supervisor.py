"""The supervisor loop against a scripted backend: fast, deterministic, no processes.

Each scripted attempt writes what a real worker would (progress records, checkpoints,
status/error files, agent record) and then ends with a given exit status. The clock
is fake: waits and the watchdog run in simulated time. The real thing (torchrun) is
covered by the integration tests; this pins the loop's decisions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import job_config, make_checkpoint, model_of

from orchestrator.backends.base import AttemptHandle
from orchestrator.config.launch import RetryPolicy, WatchdogPolicy
from orchestrator.plan import make_plan
from orchestrator.plan.topology import Topology
from orchestrator.states import JobState
from orchestrator.store import requests
from orchestrator.store.lease import Lease
from orchestrator.store.ledger import FencedOut, Ledger
from orchestrator.supervise.supervisor import Supervisor
from orchestrator.worker import channel


@dataclass
class Script:
    """What one attempt does: steps trained, checkpoints written, how it ends."""

    steps: list[int] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    unmarked_checkpoints: list[int] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)     # checkpoints whose marker this attempt loses
    worker_state: str | None = None          # status.json state
    error: dict | None = None                # error-rank0.json
    failures: dict | None = None             # agent.json failures
    returncode: int | None = 1               # None: runs until killed
    agent_record: bool = True


class ScriptedBackend:
    name = "local"

    def __init__(self, plan, scripts):
        self.plan, self.scripts = plan, list(scripts)
        self.started: list[tuple[int, str | None]] = []
        self.killed: list[int] = []
        self.rc: dict[int, int | None] = {}
        self.found: dict[int, AttemptHandle] = {}

    def start(self, plan, attempt, resume_from):
        self.started.append((attempt, resume_from))
        s = self.scripts.pop(0)
        adir = plan.paths.attempt_dir(attempt)
        adir.mkdir(parents=True)
        for step in s.steps:
            channel.append_jsonl(plan.paths.progress, {"event": "log", "attempt": attempt, "step": step,
                                                       "max_steps": 10, "loss": 1.0, "time": time.time()})
        for step in s.checkpoints:
            make_checkpoint(Path(plan.output_dir), step)
        for step in s.unmarked_checkpoints:
            make_checkpoint(Path(plan.output_dir), step, marker=False)
        for step in s.corrupt:
            (Path(plan.output_dir) / f"checkpoint-{step}" / channel.CHECKPOINT_MARKER).unlink()
        if s.worker_state:
            channel.write_json_atomic(adir / channel.STATUS_FILE, {"state": s.worker_state})
        if s.error:
            channel.write_json_atomic(adir / "error-rank0.json", {"rank": 0, "time": 1.0, **s.error})
        if s.agent_record and s.returncode is not None:
            channel.write_json_atomic(adir / channel.AGENT_RECORD_FILE,
                                      {"exit_code": s.returncode, "failures": s.failures or {}})
        self.rc[attempt] = s.returncode
        return AttemptHandle(job_id=plan.job_id, attempt=attempt, pid=1000 + attempt, attempt_dir=str(adir))

    def poll(self, handle):
        return self.rc[handle.attempt]

    def signal(self, handle, signame):
        pass

    def kill(self, handle, grace_s=10.0):
        self.killed.append(handle.attempt)
        if self.rc[handle.attempt] is None:
            self.rc[handle.attempt] = -9
        return []

    def reattach(self, handle):
        return False

    def find(self, plan, attempt):
        return self.found.get(attempt)


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.slept = 0.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s
        self.slept += s


def _setup(tmp_path, scripts, retry=None, watchdog=None):
    cfg = job_config(retry=retry or RetryPolicy(backoff_s=2.0), watchdog=watchdog or WatchdogPolicy())
    plan = make_plan(cfg, Topology(0, 2), job_id="j-1", home=tmp_path, python="python", worker_script="w.py",
                     workdir=str(tmp_path), model=model_of(cfg))
    plan.paths.run_dir.mkdir(parents=True)
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.create_job(job_id="j-1", name="t", backend="local", run_dir=plan.run_dir, config_path="c",
                      output_dir=plan.output_dir)
    return plan, ledger, ScriptedBackend(plan, scripts), FakeClock()


def _run(tmp_path, scripts, retry=None, watchdog=None):
    plan, ledger, backend, clock = _setup(tmp_path, scripts, retry, watchdog)
    events: list[str] = []
    lease = Lease.acquire(plan.run_dir)
    state = Supervisor(plan, ledger, backend, lease, on_event=events.append, clock=clock, sleep=clock.sleep).run()
    return state, ledger.get("j-1"), backend, clock, events


KILLED = {"1": {"exitcode": -9, "signal": "SIGKILL"}}


def test_a_killed_attempt_resumes_from_its_checkpoint_at_once(tmp_path):
    state, job, backend, clock, events = _run(tmp_path, [
        Script(steps=[1, 2, 3, 4, 5, 6], checkpoints=[5], failures=KILLED),
        Script(steps=[6, 7, 8, 9, 10], checkpoints=[10], worker_state="completed", returncode=0),
    ])
    assert state is JobState.COMPLETED
    assert [a.failure for a in job.attempts] == ["KILLED", "COMPLETED"]
    assert backend.started[0] == (1, None)
    assert backend.started[1][1].endswith("checkpoint-5")
    assert job.attempts[1].resumed_from.endswith("checkpoint-5") and job.attempts[1].start_step == 5
    assert clock.slept < 2.0  # a lost process's first retry does not wait backoff_s (issue 18.3)
    assert any("retry 1/" in e and "in 0 s" in e for e in events), events
    assert job.step == 10


def test_user_error_fails_after_one_attempt(tmp_path):
    state, job, backend, _, events = _run(tmp_path, [
        Script(error={"type": "ValueError", "message": "data.json: line 3: no 'messages'", "phase": "setup"}),
    ])
    assert state is JobState.FAILED
    assert [a.failure for a in job.attempts] == ["USER_ERROR"]
    assert "no 'messages'" in job.attempts[0].message
    assert "not retried" in job.message
    assert len(backend.started) == 1


def test_oom_is_not_retried_and_says_what_to_change(tmp_path):
    state, job, _, _, _ = _run(tmp_path, [
        Script(steps=[1], error={"type": "OutOfMemoryError", "message": "CUDA out of memory", "phase": "train"}),
    ])
    assert state is JobState.FAILED
    assert "per_device_train_batch_size" in job.message


def test_checkpoints_exist_but_none_is_complete_stops_instead_of_starting_over(tmp_path):
    state, job, backend, _, _ = _run(tmp_path, [
        Script(steps=[1, 2, 3], checkpoints=[3], failures=KILLED),
        Script(steps=[4, 5], corrupt=[3], unmarked_checkpoints=[5], failures=KILLED),   # the resume point is lost
    ])
    assert state is JobState.FAILED
    assert "none is complete" in job.message and len(backend.started) == 2


def test_a_first_save_cut_short_starts_over_since_no_verified_work_is_lost(tmp_path):
    state, job, backend, _, events = _run(tmp_path, [
        Script(steps=[1, 2, 3, 4, 5], unmarked_checkpoints=[5], failures=KILLED),
        Script(steps=list(range(1, 11)), checkpoints=[10], worker_state="completed", returncode=0),
    ])
    assert state is JobState.COMPLETED and backend.started[1] == (2, None)
    assert any("skipping checkpoint-5" in e and "moved to" in e for e in events)


def test_incomplete_newest_checkpoint_is_skipped_for_the_previous(tmp_path):
    state, job, backend, _, events = _run(tmp_path, [
        Script(steps=list(range(1, 8)), checkpoints=[3], unmarked_checkpoints=[6], failures=KILLED),
        Script(steps=list(range(4, 11)), worker_state="completed", returncode=0),
    ])
    assert state is JobState.COMPLETED
    assert backend.started[1][1].endswith("checkpoint-3")
    assert any("skipping checkpoint-6" in e and "moved to" in e for e in events)


def test_a_silent_attempt_is_stalled_killed_and_resumed(tmp_path):
    wd = WatchdogPolicy(stall_factor=5, stall_floor_s=30, startup_timeout_s=100)
    state, job, backend, clock, _ = _run(tmp_path, [
        Script(steps=[1, 2], checkpoints=[2], returncode=None),   # then hangs forever
        Script(steps=[3, 4], worker_state="completed", returncode=0),
    ], watchdog=wd)
    assert state is JobState.COMPLETED
    assert [a.failure for a in job.attempts] == ["STALLED", "COMPLETED"]
    assert backend.killed[0] == 1
    assert 30 <= clock.now < 60  # the floor, not the 100 s startup timeout: progress had been seen


def test_attempts_without_a_new_checkpoint_stop_the_job(tmp_path):
    state, job, backend, _, _ = _run(tmp_path, [
        Script(steps=[1], failures=KILLED), Script(steps=[1], failures=KILLED), Script(steps=[1], failures=KILLED),
    ], retry=RetryPolicy(backoff_s=1, max_restarts=5, max_no_progress=2))
    assert state is JobState.FAILED
    assert len(backend.started) == 2
    assert "saved no new checkpoint" in job.message


def test_restart_budget_is_one_per_job(tmp_path):
    scripts = [Script(steps=[s], checkpoints=[s], failures=KILLED) for s in (1, 2, 3)]
    state, job, backend, clock, _ = _run(tmp_path, scripts, retry=RetryPolicy(backoff_s=1, max_restarts=2))
    assert state is JobState.FAILED
    assert len(backend.started) == 3 and "budget" in job.message
    assert 2 <= clock.slept < 1 + 2  # the first retry at once (a kill), the second after 2 s (backoff doubled)


def test_preemption_resumes_at_once_without_charging_the_budget(tmp_path):
    scripts = [Script(steps=[s], checkpoints=[s], worker_state="stopped", returncode=75) for s in (1, 2, 3)]
    scripts.append(Script(steps=[4], worker_state="completed", returncode=0))
    state, job, _, clock, _ = _run(tmp_path, scripts, retry=RetryPolicy(backoff_s=5, max_restarts=0))
    assert state is JobState.COMPLETED
    assert [a.failure for a in job.attempts] == ["PREEMPTED"] * 3 + ["COMPLETED"]
    assert clock.slept < 5


def test_cancel_request_ends_the_attempt_and_the_job(tmp_path):
    plan, ledger, backend, clock = _setup(tmp_path, [Script(steps=[1], returncode=None)])

    def sleep(s):  # the user cancels 3 s into the attempt
        clock.sleep(s)
        sup.cancel_requested = clock.now > 3

    sup = Supervisor(plan, ledger, backend, Lease.acquire(plan.run_dir), clock=clock, sleep=sleep)
    assert sup.run() is JobState.CANCELLED
    assert backend.killed == [1]
    assert ledger.get("j-1").attempts[0].failure == "CANCELLED"


# ---- one owner per job: fencing, requests, write-ahead attempts, adoption (issue 10) ------------

def test_a_supervisor_whose_lease_is_taken_over_leaves_the_job_alone(tmp_path):
    plan, ledger, backend, clock = _setup(tmp_path, [Script(steps=[1], returncode=None)])
    lease = Lease.acquire(plan.run_dir)
    successor = {}

    def sleep(s):  # 3 s in, another supervisor takes the job (the old one was thought dead)
        clock.sleep(s)
        if clock.now > 3 and not successor:
            successor["lease"] = Lease.acquire(plan.run_dir, handoff_token=lease.token)
            ledger.update_job("j-1", fence=successor["lease"].gen, message="the successor writes")

    events = []
    sup = Supervisor(plan, ledger, backend, lease, on_event=events.append, clock=clock, sleep=sleep)
    assert sup.run() is None
    assert backend.killed == []                          # it signalled nothing
    job = ledger.get("j-1")
    assert job.message == "the successor writes"         # and wrote nothing after the successor
    assert job.attempts[0].ended is None                 # the attempt is the successor's to follow
    assert "no longer holds the job" in events[-1]


def test_writes_with_an_older_lease_generation_are_refused(tmp_path):
    _, ledger, _, _ = _setup(tmp_path, [])
    ledger.update_job("j-1", fence=2, message="new owner")
    with pytest.raises(FencedOut):
        ledger.update_job("j-1", fence=1, message="old owner")
    with pytest.raises(FencedOut):
        ledger.start_attempt("j-1", 1, resumed_from=None, start_step=0, fence=1)
    assert ledger.get("j-1").message == "new owner" and ledger.get("j-1").attempts == []


def test_a_cancel_request_file_is_acted_on_at_the_next_poll(tmp_path):
    plan, ledger, backend, clock = _setup(tmp_path, [Script(steps=[1], returncode=None)])

    def sleep(s):
        clock.sleep(s)
        if 2.0 < clock.now < 2.3:
            requests.make_request(plan.run_dir, requests.CANCEL)
            asked["at"] = clock.now

    asked = {}
    sup = Supervisor(plan, ledger, backend, Lease.acquire(plan.run_dir), clock=clock, sleep=sleep)
    assert sup.run() is JobState.CANCELLED
    assert backend.killed == [1] and clock.now - asked["at"] <= 0.5
    assert requests.pending(plan.run_dir, requests.CANCEL) is None   # done: a later resume is not cancelled


def test_an_attempt_is_recorded_before_the_backend_starts_it(tmp_path):
    plan, ledger, backend, clock = _setup(tmp_path, [Script(steps=[1], returncode=None)])

    def start(plan_, attempt, resume_from):  # the supervisor dies while the backend starts the attempt
        raise KeyboardInterrupt

    backend.start = start
    with pytest.raises(KeyboardInterrupt):
        Supervisor(plan, ledger, backend, Lease.acquire(plan.run_dir), clock=clock, sleep=clock.sleep).run()
    [att] = ledger.get("j-1").attempts
    assert (att.n, att.status, att.pid, att.ended) == (1, "STARTING", None, None)


def _adopt(tmp_path, found, scripts):
    plan, ledger, backend, clock = _setup(tmp_path, scripts)
    ledger.start_attempt("j-1", 1, resumed_from=None, start_step=0)   # left STARTING by a dead supervisor
    backend.found = found(plan)
    backend.rc.update({1: 0})
    events = []
    sup = Supervisor(plan, ledger, backend, Lease.acquire(plan.run_dir), on_event=events.append, clock=clock,
                     sleep=clock.sleep)
    return sup.run(adopt=True), ledger.get("j-1"), backend, events


def test_adoption_ends_an_attempt_that_never_started_and_starts_the_next(tmp_path):
    state, job, backend, events = _adopt(tmp_path, lambda plan: {}, [
        Script(steps=[1, 2], checkpoints=[2], worker_state="completed", returncode=0)])
    assert state is JobState.COMPLETED
    assert [(a.n, a.failure) for a in job.attempts] == [(1, "WORKER_LOST"), (2, "COMPLETED")]
    assert "never started" in job.attempts[0].message
    assert [n for n, _ in backend.started] == [2]


def test_adoption_follows_an_attempt_started_but_never_recorded(tmp_path):
    def found(plan):
        adir = plan.paths.attempt_dir(1)
        adir.mkdir(parents=True)
        channel.write_json_atomic(adir / channel.STATUS_FILE, {"state": "completed"})
        channel.write_json_atomic(adir / channel.AGENT_RECORD_FILE, {"exit_code": 0, "failures": {}})
        return {1: AttemptHandle(job_id="j-1", attempt=1, pid=4321, attempt_dir=str(adir), pid_start=12.5, host="h")}

    state, job, backend, events = _adopt(tmp_path, found, [])
    assert state is JobState.COMPLETED and backend.started == []          # no second copy started
    [att] = job.attempts
    assert (att.failure, att.pid, att.pid_start, att.host) == ("COMPLETED", 4321, 12.5, "h")
    assert any("died before recording it" in e for e in events)


def test_sighup_hand_off_leaves_the_attempt_running_for_the_new_supervisor(tmp_path):
    plan, ledger, backend, clock = _setup(tmp_path, [Script(steps=[1], returncode=None)])
    lease = Lease.acquire(plan.run_dir)
    spawned = []

    def hand_off(token):  # what the background supervisor does: take the lease with the token
        spawned.append(Lease.acquire(plan.run_dir, handoff_token=token))
        return 999

    def sleep(s):
        clock.sleep(s)
        if clock.now > 1 and not spawned:
            sup.request_hand_off()

    sup = Supervisor(plan, ledger, backend, lease, clock=clock, sleep=sleep, hand_off=hand_off,
                     process_alive=lambda pid: True)
    assert sup.run() is None
    assert backend.killed == [] and ledger.get("j-1").attempts[0].ended is None
    assert spawned[0].gen == lease.gen + 1


# ---- a full disk (issue 10) ----------------------------------------------------------------------

ENOSPC_ERROR = {"type": "OSError", "message": "[Errno 28] No space left on device", "phase": "train", "errno": 28}


def test_a_full_disk_stops_the_job_keeps_every_complete_checkpoint_and_clears_incomplete_ones(tmp_path):
    state, job, backend, _, _ = _run(tmp_path, [
        Script(steps=[1, 2, 3, 4], checkpoints=[2], unmarked_checkpoints=[4], error=ENOSPC_ERROR)])
    assert state is JobState.FAILED and len(backend.started) == 1
    assert job.attempts[0].failure == "DISK_FULL"
    out = Path(job.output_dir)
    assert "disk full in" in job.message and " free, one checkpoint takes " in job.message
    assert (out / "checkpoint-2" / channel.CHECKPOINT_MARKER).is_file()        # complete: kept
    assert not (out / "checkpoint-4").exists()                                  # incomplete: moved aside
    assert [p.name.split(".")[0] for p in (out / ".incomplete").iterdir()] == ["checkpoint-4"]


def test_the_supervisors_own_full_disk_stops_the_job(tmp_path):
    import sqlite3

    plan, ledger, backend, clock = _setup(tmp_path, [Script(steps=[1], returncode=None)])
    real = ledger.update_job

    def update_job(job_id, **fields):
        if clock.now > 2:
            raise sqlite3.OperationalError("database or disk is full")
        return real(job_id, **fields)

    ledger.update_job = update_job
    events = []
    sup = Supervisor(plan, ledger, backend, Lease.acquire(plan.run_dir), on_event=events.append, clock=clock,
                     sleep=clock.sleep)
    assert sup.run() is JobState.FAILED
    assert backend.killed == [1]                      # the job is stopped, not left running unsupervised
    assert any(e.startswith("DISK_FULL (the supervisor's own write") for e in events)

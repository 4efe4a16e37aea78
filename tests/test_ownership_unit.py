"""Issue 17, fast: the fence around starting and destroying, only the owner steers, and the SLURM items.

Real files, real processes where cheap; SLURM commands through a fake runner playing back the real
output shapes (scripts/slurm-lab.sh, Slurm 22.05); clocks are injected.
"""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import job_config, model_of

from orchestrator.backends.base import AttemptHandle
from orchestrator.backends.slurm import allocation, rendezvous
from orchestrator.backends.slurm.steps import SlurmStepBackend
from orchestrator.config.slurm import parse_slurm
from orchestrator.dashboard.plan_view import describe_plan
from orchestrator.plan import make_plan
from orchestrator.plan.topology import Topology
from orchestrator.states import JobState
from orchestrator.store import private
from orchestrator.store.jobs import open_ledger
from orchestrator.store.lease import Lease, LeaseLost, Owner, read_lease
from orchestrator.store.ledger import Ledger
from orchestrator.supervise import disk, elsewhere
from orchestrator.supervise.supervisor import Supervisor
from orchestrator.worker import channel, fence

JOB = "j-1"


# ---- the fence around starting an attempt and around destructive steps ----------------------------

class PausingBackend:
    """Starts a real process; while it does, its supervisor is "paused" past half its lease."""

    name = "local"

    def __init__(self, mono):
        self.mono, self.killed, self.started = mono, [], []

    def start(self, plan, attempt, resume_from):
        plan.paths.attempt_dir(attempt).mkdir(parents=True)
        self.started.append(dict(plan.env))
        self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.mono.t += 100   # a SIGSTOP between start_attempt and here, longer than the lease
        return AttemptHandle(job_id=plan.job_id, attempt=attempt, pid=self.proc.pid,
                             attempt_dir=str(plan.paths.attempt_dir(attempt)))

    def kill(self, handle, grace_s=10.0):
        self.killed.append(handle.attempt)
        self.proc.kill()
        self.proc.wait()
        return []

    def poll(self, handle):
        return self.proc.poll()


class Mono:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _job(tmp_path):
    cfg = job_config()
    plan = make_plan(cfg, Topology(0, 2), job_id=JOB, home=tmp_path, python="python", worker_script="w.py",
                     workdir=str(tmp_path), model=model_of(cfg))
    plan.paths.run_dir.mkdir(parents=True)
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.create_job(job_id=JOB, name="t", backend="local", run_dir=plan.run_dir, config_path="c",
                      output_dir=plan.output_dir)
    return plan, ledger


def test_what_a_holder_started_after_losing_its_lease_is_stopped_and_it_carries_the_generation(tmp_path):
    plan, ledger = _job(tmp_path)
    mono = Mono()
    lease = Lease.acquire(plan.run_dir, duration_s=10, clock=mono)
    backend = PausingBackend(mono)
    sup = Supervisor(plan, ledger, backend, lease, sleep=lambda s: None)
    assert sup.run() is None                                   # it left the job
    assert backend.killed == [1] and backend.proc.poll() is not None
    assert backend.started[0][channel.ENV_LEASE_GEN] == "1"    # contract 2: the ranks know their generation


def test_moving_aside_and_replacing_the_plan_check_the_fence_first(tmp_path):
    from orchestrator.supervise.jobs import replace_plan

    plan, ledger = _job(tmp_path)
    incomplete = Path(plan.output_dir) / "checkpoint-4"
    incomplete.mkdir(parents=True)

    def lost():
        raise LeaseLost("taken over")

    with pytest.raises(LeaseLost):
        disk.move_aside(plan.output_dir, [incomplete], fence=lost)
    assert incomplete.is_dir()
    with pytest.raises(LeaseLost):
        replace_plan(ledger.get(JOB), plan, 1, fence=lost)
    assert not (Path(plan.run_dir) / "plan.1.json").exists()


def test_a_halted_rank_writes_its_end_record_and_nothing_else(tmp_path):
    code = ("import sys; from orchestrator.worker.support import WorkerEnv; from orchestrator.worker.fence import halt; "
            f"halt(WorkerEnv.from_environ({str(tmp_path)!r}), 0, 7, 'lease generation 2 replaced 1')")
    env = {**os.environ, channel.ENV_RUN_DIR: str(tmp_path), channel.ENV_ATTEMPT_DIR: str(tmp_path / "a"),
           channel.ENV_ATTEMPT: "3"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == channel.EXIT_STOPPED, r.stderr
    assert channel.read_json(tmp_path / "a" / channel.STATUS_FILE)["halted"] == "lease generation 2 replaced 1"
    assert channel.read_progress(tmp_path / channel.PROGRESS_FILE)[-1]["event"] == "end"


def test_the_ranks_beat_is_judged_by_what_this_host_sees_change(tmp_path):
    adir = tmp_path / "runs" / JOB / "attempts" / "1"
    adir.mkdir(parents=True)
    beat = adir / channel.HEARTBEAT_FILE
    channel.write_json_atomic(beat, {"time": 1e12, "step": 3, "phase": "training"})   # a clock far off: irrelevant
    run_dir = adir.parent.parent
    assert elsewhere.ranks_beat(run_dir, adir, wait_s=0.0, window_s=0.3) is None      # first look
    assert elsewhere.ranks_beat(run_dir, adir, wait_s=1.0, window_s=0.3) is False      # unchanged 0.3 s: silent
    stop = threading.Event()

    def beating():
        t = 0
        while not stop.wait(0.05):
            t += 1
            channel.write_json_atomic(beat, {"time": t, "step": 3, "phase": "training"})

    threading.Thread(target=beating, daemon=True).start()
    time.sleep(0.2)   # they beat again
    try:
        assert elsewhere.ranks_beat(run_dir, adir, wait_s=2.0, window_s=0.3) is True
    finally:
        stop.set()
    channel.write_json_atomic(adir / channel.STATUS_FILE, {"state": "stopped"})
    assert elsewhere.ranks_beat(run_dir, adir) is False                                # their end record


def test_an_attempt_knows_which_process_table_it_lives_in(tmp_path):
    plan, _ = _job(tmp_path)
    record = type("R", (), {"n": 1, "host": socket.gethostname()})()
    assert elsewhere.place(plan, record).here
    channel.write_json_atomic(plan.paths.launch_record(1), {"host": socket.gethostname(), "ns": "boot/pid:[9]"})
    assert not elsewhere.place(plan, record).here      # same host name, another PID namespace


# ---- only the owner steers ---------------------------------------------------------------------------

def test_the_home_and_a_run_directory_are_private_and_others_writable_ones_refused(tmp_path):
    home = tmp_path / "home"
    open_ledger(home)
    for d in (home, home / "runs", home / "index"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    os.chmod(home, 0o775)                                   # a group project space with umask 002
    with pytest.raises(private.NotPrivate, match="writable by its group.*chmod go-w"):
        open_ledger(home)
    os.chmod(home, 0o700)
    os.chown(home / "runs", 65534, -1)                      # another user's
    with pytest.raises(private.NotPrivate, match="belongs to uid 65534"):
        open_ledger(home)


def test_a_new_jobs_files_are_the_owners_alone_and_a_tampered_plan_is_refused(tmp_path, monkeypatch):
    from orchestrator.store.jobs import open_ledger as open_home
    from orchestrator.supervise.jobs import create_job, load_plan

    monkeypatch.setenv("ORCHESTRATE_HOME", str(tmp_path / "home"))
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text("max_steps: 1\n")
    cfg = job_config(source=cfg_file)
    plan = make_plan(cfg, Topology(0, 2), job_id=JOB, home=tmp_path / "home", python="python", worker_script="w.py",
                     workdir=str(tmp_path), model=model_of(cfg))
    old = os.umask(0o002)
    try:
        job = create_job(cfg, plan, open_home())
    finally:
        os.umask(old)
    run = Path(job.run_dir)
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    for name in ("config.yaml", "worker_config.yaml", "plan.json"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o600, name
    assert load_plan(job).job_id == JOB
    os.chmod(run / "plan.json", 0o666)
    with pytest.raises(private.NotPrivate, match="plan"):
        load_plan(job)


def test_the_batch_steps_guard_refuses_a_pickle_others_may_write(tmp_path):
    folder = tmp_path / "slurm"
    folder.mkdir(mode=0o700)
    pickle = folder / "33_submitted.pkl"
    pickle.write_bytes(b"x")
    os.chmod(pickle, 0o600)
    run = [sys.executable, "-m", "orchestrator.store.private", str(tmp_path), str(folder)]
    os.chmod(tmp_path, 0o700)
    assert subprocess.run(run, capture_output=True).returncode == 0
    os.chmod(pickle, 0o664)
    r = subprocess.run(run, capture_output=True, text=True)
    assert r.returncode == 2 and "33_submitted.pkl" in r.stderr and "writable by its group" in r.stderr


def test_secrets_in_launch_env_are_masked_in_the_dry_run(tmp_path):
    from dataclasses import replace

    cfg = job_config()
    plan = make_plan(cfg, Topology(0, 2), job_id=JOB, home=tmp_path, python="python", worker_script="w.py",
                     workdir=str(tmp_path), model=model_of(cfg))
    plan = replace(plan, env={**plan.env, "HF_TOKEN": "hf_QvZ81kq", "WANDB_API_KEY": "0wQk7ZzX",
                              "NCCL_DEBUG": "WARN"})
    text = describe_plan(plan)
    assert "hf_QvZ81kq" not in text and "0wQk7ZzX" not in text and "HF_TOKEN='<hidden>'" in text and "WANDB_API_KEY='<hidden>'" in text
    assert "NCCL_DEBUG=WARN" in text


# ---- SLURM ---------------------------------------------------------------------------------------------

def test_kill_and_signal_use_the_attempts_own_slurm_job_after_a_relocation(tmp_path):
    adir = tmp_path / "attempts" / "1"
    channel.write_json_atomic(adir / "nodes" / "0" / "node.json", {"slurm_step_id": "5"})
    channel.write_json_atomic(adir / "slurm.json", {"job_id": "33", "nodes": ["n1"], "nnodes": 1})
    calls = []
    backend = SlurmStepBackend("40", runner=lambda argv, **kw: (calls.append(argv), (0, "", ""))[1])
    handle = AttemptHandle(JOB, 1, 0, str(adir), external_id="33.5")
    backend.kill(handle)
    backend.signal(handle, "SIGUSR2")
    assert calls == [["scancel", "33.5"], ["scancel", "--signal=USR2", "33.5"]]   # never 40.5


def test_a_scancel_is_read_from_saccts_base_state_not_squeues_completing():
    def runner(argv, input=None, timeout=60.0):
        if argv[0] == "squeue":
            return 0, "33|COMPLETING|None|n1\n", ""
        return 0, "Welcome!\n33|CANCELLED by 0|0:15||n1\n33.batch|CANCELLED|0:15||n1\n", ""

    assert allocation.ending_state("33", runner)() is JobState.CANCELLED
    requeued = lambda argv, **kw: (0, "33|REQUEUED|0:0||n1\n", "")   # noqa: E731 - the time limit: not a cancel
    assert allocation.ending_state("33", requeued)() is None


def test_the_state_of_many_allocations_is_one_squeue_and_one_sacct_call():
    calls = []

    def runner(argv, input=None, timeout=60.0):
        calls.append(argv[0])
        if argv[0] == "squeue":
            return 0, "31|RUNNING|None|n1\n32|PENDING|Resources|\n", ""
        return 0, "33|FAILED|1:0||n2\n", ""

    infos = allocation.allocation_states(["31", "32", "33"], runner)
    assert calls == ["squeue", "sacct"]
    assert {k: v.state for k, v in infos.items()} == {"31": "RUNNING", "32": "PENDING", "33": "FAILED"}


def test_rendezvous_ports_of_concurrent_steps_never_collide(tmp_path, monkeypatch):
    monkeypatch.setattr(rendezvous, "LOCK_DIR", tmp_path / "locks")
    start = 20000 + 4321
    first = rendezvous.reserve(start)
    second = rendezvous.reserve(start)                 # another job whose id hashes to the same port
    assert first.port == start and second.port != first.port
    import socket as sk

    busy = sk.socket()
    busy.bind(("", start + 2))                         # something else listens there
    third = rendezvous.reserve(start)
    assert third.port not in (first.port, second.port, start + 2)
    first.close()
    assert rendezvous.reserve(start).port == start     # given back when its step ended
    busy.close()


@pytest.mark.parametrize("key, alias", [("requeu", "requeue"), ("sig", "signal"), ("no-k", "no-kill"),
                                        ("no_requeue", None), ("no-kill", None), ("signal", None)])
def test_slurm_extra_cannot_override_requeue_no_kill_or_the_signal(key, alias):
    _, problems = parse_slurm({"time": "10", "extra": {key: True}}, required=True)
    assert len(problems) == 1 and problems[0].startswith(f"launch.slurm.extra.{key}: not allowed here")
    if alias:
        assert f"sbatch reads it as --{alias}" in problems[0]


def test_a_requeued_allocation_waits_for_the_dead_steps_lease_then_takes_over(tmp_path, monkeypatch):
    from orchestrator.supervise import in_allocation

    run_dir = tmp_path / "runs" / JOB
    run_dir.mkdir(parents=True)
    dead = Owner(host="n1", pid=4242, start_time=1.0, token="old", ns="x", where="slurm:33")
    Lease.acquire(run_dir, owner=dead, duration_s=1.0)      # its node was lost with it: never released
    monkeypatch.setenv("ORCHESTRATE_LEASE_S", "1")
    job = type("J", (), {"id": JOB, "run_dir": str(run_dir), "backend": "slurm", "attempts": []})()
    said = []
    t0 = time.monotonic()
    lease = in_allocation._after_previous_holder(job, read_lease(run_dir), "33", said.append)
    assert lease is not None and lease.gen == 2 and time.monotonic() - t0 >= 1.0
    assert "waiting up to" in said[0]
    lease.release()
    other = Owner(host="n5", pid=1, start_time=1.0, token="live", ns="y", where="slurm:77")
    Lease.acquire(run_dir, owner=other, duration_s=1.0)
    monkeypatch.setattr(allocation, "allocation_state", lambda job_id: allocation.JobInfo(job_id, "RUNNING"))
    assert in_allocation._after_previous_holder(job, read_lease(run_dir), "33", said.append) is None
    assert "SLURM job 77, which still runs" in said[-1]


def test_a_fenced_attempt_is_told_to_stop_and_an_adopted_one_is_not(tmp_path):
    first = Lease.acquire(tmp_path, duration_s=60)
    env = {channel.ENV_LEASE_GEN: str(first.gen)}
    Lease.acquire(tmp_path, owner=Owner("h", 1, 1.0, "t2"), handoff_token=first.token, continues=(2,), duration_s=60)
    assert fence.must_stop(tmp_path, 2, env) is None and fence.must_stop(tmp_path, 1, env)


def test_another_hosts_attempt_is_read_from_its_records_never_from_this_process_table(tmp_path):
    from orchestrator.backends.local import LocalBackend

    adir = tmp_path / "attempts" / "1"
    channel.write_json_atomic(adir / "launch.json", {"host": "login-a", "ns": "boot/pid:[7]", "pid": os.getpid()})
    handle = AttemptHandle(JOB, 1, os.getpid(), str(adir), pid_start=1.0, host="login-a")   # a PID alive *here*
    backend = LocalBackend()
    assert backend.poll(handle) == -9                         # silent, no record: not "running" by our PID
    channel.write_json_atomic(adir / channel.STATUS_FILE, {"state": "stopped"})
    assert backend.poll(handle) == channel.EXIT_STOPPED        # rank 0's end record
    channel.write_json_atomic(adir / channel.AGENT_RECORD_FILE, {"exit_code": 0})
    assert backend.poll(handle) == 0                           # torchrun's exit record


_END_OF_TRAINING = """
import types
from orchestrator.worker.callback import OrchestrateCallback
from orchestrator.worker.support import StopFlag, WorkerEnv

cb = OrchestrateCallback(WorkerEnv.from_environ({out!r}), StopFlag(), None, 0, None)
cb.saves = types.SimpleNamespace(close=lambda: print("saves closed"))   # the save in flight settles first
cb.on_train_end(None, types.SimpleNamespace(global_step=8), None)
print("went on to the final model")
"""


@pytest.mark.parametrize("newer", [False, True])
def test_the_end_of_training_rereads_the_fence_so_a_late_fenced_attempt_writes_no_final_model(tmp_path, newer):
    """The step path reads the fence once a second: an attempt fenced in its last second reaches the end of
    training; there the fence is read exactly, and the attempt halts before the final model is saved."""
    (tmp_path / "lease").mkdir()
    for gen in (1, 2) if newer else (1,):
        channel.write_json_atomic(tmp_path / "lease" / channel.LEASE_FILE.format(gen=gen), {"owner": {"pid": 1}})
    env = {**os.environ, channel.ENV_RUN_DIR: str(tmp_path), channel.ENV_ATTEMPT_DIR: str(tmp_path / "a"),
           channel.ENV_ATTEMPT: "1", channel.ENV_LEASE_GEN: "1", "RANK": "0", "WORLD_SIZE": "1"}
    (tmp_path / "a").mkdir()
    r = subprocess.run([sys.executable, "-c", _END_OF_TRAINING.format(out=str(tmp_path))], env=env,
                       capture_output=True, text=True, timeout=120)
    assert "saves closed" in r.stdout, r.stderr
    if not newer:
        assert r.returncode == 0 and "went on to the final model" in r.stdout, r.stderr
        return
    assert r.returncode == channel.EXIT_STOPPED and "went on" not in r.stdout, r.stderr
    end = channel.read_progress(tmp_path / channel.PROGRESS_FILE)[-1]
    assert end["event"] == "end" and end["state"] == channel.WORKER_STOPPED and "generation 2" in end["halted"]

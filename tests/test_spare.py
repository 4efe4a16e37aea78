"""Spare attempts (issue 18.3): the local backend starts the next attempt ahead and hands it over, with real
(tiny) processes standing in for torchrun; the worker side waits for the hand-over or leaves quietly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.backends.local import LocalBackend
from orchestrator.backends.processes import job_processes
from orchestrator.backends.spare import spare_after_s
from orchestrator.store.paths import RunPaths
from orchestrator.worker import channel, spare

# A stand-in agent: a spare waits for go.json (as the ranks do), then says what it was handed; attempt 1 says
# it trains and runs until killed.
AGENT = """
import json, os, sys, time
from pathlib import Path
adir = Path(os.environ["ORCHESTRATE_ATTEMPT_DIR"])
if os.environ.get("ORCHESTRATE_SPARE"):
    while not (adir / "go.json").exists():
        time.sleep(0.02)
    env = json.loads((adir / "go.json").read_text())["env"]
    (adir / "handed.json").write_text(json.dumps({"pid": os.getpid(), **env}))
    sys.exit(0)
(adir / "hb.tmp").write_text(json.dumps({"phase": "training", "time": time.time()}))
os.replace(adir / "hb.tmp", adir / "heartbeat.json")
time.sleep(120)
"""


def _plan(tmp_path, job_id="j-spare", flavour="a"):
    paths = RunPaths(tmp_path / "runs" / job_id)

    def attempt_env(attempt, resume_from):
        return {channel.ENV_JOB_ID: job_id, channel.ENV_ATTEMPT: str(attempt), "FLAVOUR": flavour,
                channel.ENV_ATTEMPT_DIR: str(paths.attempt_dir(attempt)),
                channel.ENV_RESUME_FROM: resume_from or "none"}
    return SimpleNamespace(job_id=job_id, paths=paths, workdir=str(tmp_path), attempt_env=attempt_env,
                           argv=lambda attempt: [sys.executable, "-c", AGENT])


@pytest.fixture
def backend(monkeypatch):
    monkeypatch.setenv("ORCHESTRATE_SPARE_AFTER_S", "0")
    b = LocalBackend()
    yield b
    for job_id in list(b._spares):
        b.discard_spares(job_id)
    for proc in b._children.values():
        proc.kill()


def _spare_started(backend, handle) -> None:
    """Poll the attempt as the supervisor does until its spare is started."""
    _wait(lambda: backend.poll(handle) is None and handle.job_id in backend._spares)


def _wait(pred, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_the_next_attempt_waits_as_a_spare_and_is_handed_its_resume_point(tmp_path, backend):
    plan = _plan(tmp_path)
    first = backend.start(plan, 1, None)
    _spare_started(backend, first)                         # training: the spare for attempt 2 starts
    spare_pid = backend._spares[plan.job_id].proc.pid
    assert {p.pid for p in job_processes(plan.job_id, attempt=2)} >= {spare_pid}   # tagged as attempt 2
    backend.kill(first, grace_s=2)
    second = backend.start(plan, 2, "/ckpt/checkpoint-10")
    assert second.pid == spare_pid
    handed = Path(second.attempt_dir) / "handed.json"
    _wait(handed.is_file)
    assert json.loads(handed.read_text())["ORCHESTRATE_RESUME_FROM"] == "/ckpt/checkpoint-10"
    _wait(lambda: backend.poll(second) is not None)
    assert backend.poll(second) == 0
    assert "handed" in channel.read_json(Path(second.attempt_dir) / spare.SPARE_FILE)


def test_a_spare_started_for_another_environment_is_discarded_and_the_attempt_starts_cold(tmp_path, backend):
    plan = _plan(tmp_path)
    first = backend.start(plan, 1, None)
    _spare_started(backend, first)
    old = backend._spares[plan.job_id].proc
    backend.kill(first, grace_s=2)
    second = backend.start(_plan(tmp_path, flavour="b"), 2, None)
    assert second.pid != old.pid and old.poll() is not None
    backend.kill(second, grace_s=2)


def test_a_job_that_ends_leaves_no_spare_and_a_dead_owners_spare_folder_is_moved_aside(tmp_path, backend):
    plan = _plan(tmp_path)
    first = backend.start(plan, 1, None)
    _spare_started(backend, first)
    backend.discard_spares(plan.job_id)
    assert job_processes(plan.job_id, attempt=2) == [] and not plan.paths.attempt_dir(2).exists()
    # What a supervisor that died leaves: a spare's folder, never handed over.
    stale = plan.paths.attempt_dir(3)
    stale.mkdir(parents=True)
    channel.write_json_atomic(stale / spare.SPARE_FILE, {"owner": 1, "started": 0})
    backend.kill(first, grace_s=2)
    backend._plans.clear()                                 # an adopted job: no spare, a cold start
    third = backend.start(plan, 3, None)
    assert list((plan.paths.attempt_dir(3).parent / ".spares").iterdir())
    backend.kill(third, grace_s=2)


def test_spare_after_s_reads_the_environment():
    assert spare_after_s({}) == 30.0
    assert spare_after_s({"ORCHESTRATE_SPARE_AFTER_S": "0"}) == 0.0
    assert spare_after_s({"ORCHESTRATE_SPARE_AFTER_S": "off"}) is None


def test_a_rank_waits_for_the_hand_over_and_takes_its_environment(tmp_path, monkeypatch):
    me = subprocess.run([sys.executable, "-c", "import psutil, os; p = psutil.Process(os.getppid()); "
                         "print(p.pid, p.create_time())"], capture_output=True, text=True).stdout.split()
    monkeypatch.setenv(spare.ENV_SPARE, f"{me[0]}:{me[1]}")
    monkeypatch.setenv(channel.ENV_ATTEMPT_DIR, str(tmp_path))
    monkeypatch.setattr(spare, "preload", lambda script: None)
    timer = threading.Timer(0.3, lambda: channel.write_json_atomic(tmp_path / spare.GO_FILE, {
        "env": {channel.ENV_RESUME_FROM: "/c/checkpoint-4"}, "time": 123.0}))
    timer.start()
    assert spare.wait_for_attempt(stop=False) == 123.0
    assert os.environ[channel.ENV_RESUME_FROM] == "/c/checkpoint-4"
    monkeypatch.delenv(spare.ENV_SPARE)
    assert spare.wait_for_attempt(stop=False) is None       # not a spare: at once


def test_a_spare_whose_owner_is_gone_leaves_quietly(tmp_path):
    code = ("import os; os.environ['ORCHESTRATE_SPARE'] = '1:1'; os.environ['ORCHESTRATE_ATTEMPT_DIR'] = %r\n"
            "from orchestrator.worker import spare\nspare.preload = lambda script: None\n"
            "spare.OWNER_CHECK_S = 0.1\nspare.wait_for_attempt(stop=False)\nraise SystemExit(3)" % str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr                     # left, not handed (3 would mean it went on)

"""Process identity (orchestrator/backends/processes.py): nothing is signalled unless PID, start time and
job tag all match; an attempt's processes are told apart from the next attempt's."""
from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from orchestrator.backends.processes import ProcessId, attempt_root, job_processes, kill_job_processes, verified
from orchestrator.worker import channel

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def spawn():
    procs = []

    def start(job: str | None, attempt: int | None = 1, argv=SLEEPER):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATE_")}
        if job:
            env[channel.ENV_JOB_ID] = job
        if attempt is not None:
            env[channel.ENV_ATTEMPT] = str(attempt)
        p = subprocess.Popen(argv, env=env)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_a_stored_pid_counts_only_with_its_start_time_and_the_job_tag(spawn):
    p = spawn("job-a")
    ident = ProcessId.of(p.pid)
    assert verified(ident, "job-a") is not None
    assert verified(ProcessId(p.pid, ident.start_time - 5.0, ident.host), "job-a") is None   # PID reused
    assert verified(ident, "job-b") is None                                                 # not our job
    assert verified(ProcessId(p.pid, ident.start_time, "another-host"), "job-a") is None    # not this host
    untagged = spawn(None)
    assert verified(ProcessId.of(untagged.pid), "job-a") is None


def test_a_reused_pid_is_never_signalled(spawn):
    stranger = spawn(None)                                  # e.g. what now runs under an old attempt's PID
    wrong = ProcessId(stranger.pid, ProcessId.of(stranger.pid).start_time + 100.0, ProcessId.of(1).host)
    assert kill_job_processes("job-a", wrong, grace_s=1.0) == []
    assert stranger.poll() is None and psutil.Process(stranger.pid).is_running()


def test_killing_one_attempt_leaves_the_next_attempts_processes(spawn):
    old, new = spawn("job-a", attempt=1), spawn("job-a", attempt=2)
    assert {p.pid for p in job_processes("job-a")} >= {old.pid, new.pid}
    assert attempt_root("job-a", 2).pid == new.pid
    assert kill_job_processes("job-a", grace_s=2.0, attempt=1) == []
    assert old.wait(timeout=10) is not None and new.poll() is None

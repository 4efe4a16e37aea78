"""One owner per job, with real processes and signals (issue 10): a closed terminal, a dead supervisor,
two ``resume`` at once, and ``cancel`` with nobody supervising; across hosts (issue 17): a second login
node (its own host name and PID namespace, ``unshare``) sharing the home never duplicates an attempt."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from orch_helpers import (
    REPO,
    Tmux,
    env_for,
    job_processes,
    max_logged_step,
    orch,
    progress,
    single_job_id,
    status,
    wait_for,
    write_config,
)

from orchestrator.worker import channel

pytestmark = pytest.mark.integration

FAST = {"retry": {"backoff_s": 0.5}, "watchdog": {"stall_floor_s": 30, "startup_timeout_s": 300}}


def _config(tmp_path, assets, **kw):
    opts = dict(max_steps=30, save_steps=10, logging_steps=1)
    opts.update(kw)
    return write_config(tmp_path, assets, launch=FAST, **opts)


def _first_step(home, job_id):
    run_dir = status(home, job_id)["run_dir"]
    wait_for(lambda: any(r["event"] == "log" for r in progress(run_dir)), 300, "the first training step")
    return run_dir


def _wait_state(home, job_id, states=("COMPLETED", "FAILED", "CANCELLED"), timeout=420):
    return wait_for(lambda: (lambda j: j if j["state"] in states else None)(status(home, job_id)), timeout,
                    f"{job_id} to reach {states}", interval=0.5)


def test_a_closed_terminal_hands_the_job_to_a_background_supervisor(tmp_path, demo_assets):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed: the closed-terminal test needs a real terminal")
    home = tmp_path / "home"
    cfg = _config(tmp_path, demo_assets)
    env = env_for(home, TERM="xterm-256color")
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()
                       if k.startswith(("ORCHESTRATE_", "PATH", "HOME", "PYTHON", "TERM")))
    argv = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "orchestrator.cli", "submit", str(cfg)))
    tmux = Tmux()
    try:
        tmux.start("submit", f"cd {shlex.quote(str(REPO))} && env {exports} {argv}")
        job_id = wait_for(lambda: _job_id(home), 120, "the job in the ledger")
        run_dir = _first_step(home, job_id)
        assert "Ctrl-C CANCELS" in tmux.screen("submit")
        tmux.kill()                                   # the terminal goes away: SIGHUP
        job = _wait_state(home, job_id)
    finally:
        tmux.kill()
    assert job["state"] == "COMPLETED" and job["step"] == 30
    assert [a["failure"] for a in job["attempts"]] == ["COMPLETED"], "the running attempt was not restarted"
    log = (tmp_path / "home" / "runs" / job_id / "supervisor.log").read_text()
    assert "handing the job to a background supervisor" in log and "following attempt 1 again" in log
    assert "cancel" not in log.lower()
    assert job_processes(job_id) == [] and run_dir


def _job_id(home):
    r = orch(home, "list", "--json", timeout=60)
    return r.returncode == 0 and r.stdout.strip() not in ("", "[]") and single_job_id(home)


def test_two_resumes_at_once_give_exactly_one_supervisor(tmp_path, demo_assets):
    home = tmp_path / "home"
    r = orch(home, "submit", "--detach", str(_config(tmp_path, demo_assets)), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    _first_step(home, job_id)
    os.kill(status(home, job_id)["supervisor"]["pid"], signal.SIGKILL)
    gone = status(home, job_id)
    assert gone["supervisor"]["alive"] is False and gone["state"] == "RUNNING"
    listed = orch(home, "list", timeout=60)
    assert f"run: orchestrate resume {job_id}" in listed.stderr, "a later command says the supervisor is gone"

    results = []
    threads = [threading.Thread(target=lambda: results.append(orch(home, "resume", "--detach", job_id, timeout=120)))
               for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [x.returncode for x in results] == [0, 0], [x.stderr for x in results]
    outs = sorted(x.stdout.strip() for x in results)
    assert outs[0] == job_id and outs[1].startswith(f"{job_id} is already supervised by pid"), outs
    job = _wait_state(home, job_id)
    assert job["state"] == "COMPLETED"
    assert [a["failure"] for a in job["attempts"]] == ["COMPLETED"], "the attempt was adopted, not restarted"
    log = (home / "runs" / job_id / "supervisor.log").read_text()
    assert log.count("following attempt 1 again") == 1


def test_cancel_with_no_live_supervisor_acts_itself(tmp_path, demo_assets):
    home = tmp_path / "home"
    r = orch(home, "submit", "--detach", str(_config(tmp_path, demo_assets, max_steps=400)), cwd=tmp_path,
             timeout=120)
    job_id = r.stdout.strip()
    _first_step(home, job_id)
    os.kill(status(home, job_id)["supervisor"]["pid"], signal.SIGKILL)
    assert len(job_processes(job_id)) >= 3, "the attempt runs on without its supervisor"
    c = orch(home, "cancel", job_id, timeout=120)
    assert c.returncode == 0, c.stdout + c.stderr
    job = status(home, job_id)
    assert job["state"] == "CANCELLED" and [a["failure"] for a in job["attempts"]] == ["CANCELLED"]
    assert job_processes(job_id) == []


# ---- issue 17: a second login node (its own host name and PID namespace) sharing the home -------------

LEASE_S = "6"   # short leases: the second host's judgements (no renewal seen for 6 s, no beat for 10 s) come quickly


def _on_host_b(home, *args, timeout=240):
    """The CLI on a second login node: its own host name and process table (`unshare --uts --pid`), same files."""
    # Its own host name, resolvable there as on a real login node (its /etc/hosts), and its own PID namespace.
    sh = ('hostname "$0" && h=$(mktemp) && cat /etc/hosts > "$h" && echo "127.0.0.1 $0" >> "$h" && '
          'mount --bind "$h" /etc/hosts && exec "$@"')
    argv = ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c", sh, "login-b", sys.executable, "-m",
            "orchestrator.cli", *args]
    return subprocess.run(argv, env=env_for(home, ORCHESTRATE_LEASE_S=LEASE_S), capture_output=True, text=True,
                          timeout=timeout)


def test_a_second_host_never_duplicates_an_attempt_and_cancels_it_only_once_its_ranks_ended(tmp_path, demo_assets):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--uts", "--pid", "--fork", "true"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("needs unshare with UTS and PID namespaces (root)")
    home = tmp_path / "home"
    r = orch(home, "submit", "--detach", str(_config(tmp_path, demo_assets, max_steps=400)), cwd=tmp_path,
             timeout=120, env_extra={"ORCHESTRATE_LEASE_S": LEASE_S})
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    run_dir = _first_step(home, job_id)
    os.kill(status(home, job_id)["supervisor"]["pid"], signal.SIGKILL)   # its ranks go on training on this host
    here = socket.gethostname()

    refused = _on_host_b(home, "resume", job_id)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"attempt 1 still runs on {here}" in refused.stderr and f"on {here} run: orchestrate resume" in refused.stderr
    assert not (Path(run_dir) / "attempts" / "2").exists() and len(status(home, job_id)["attempts"]) == 1
    step = max_logged_step(run_dir)
    wait_for(lambda: max_logged_step(run_dir) > step + 2, 120, "training to go on after the refused resume")

    cancelled = _on_host_b(home, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    assert "CANCELLED" in cancelled.stdout
    left = [p for p in job_processes(job_id) if psutil.Process(p).environ().get("RANK") is not None]
    assert left == [], f"ranks still alive when the second host reported CANCELLED: {left}"
    job = status(home, job_id)
    assert job["state"] == "CANCELLED" and [a["failure"] for a in job["attempts"]] == ["CANCELLED"]
    end = channel.read_json(Path(run_dir) / "attempts" / "1" / channel.STATUS_FILE)
    assert end["state"] == "stopped" and end["halted"]     # the ranks' own end record: stopped at a step boundary
    wait_for(lambda: job_processes(job_id) == [], 60, "the torchrun agent to exit")

"""Processes of the orchestrator's own: finding, probing, signalling and starting them.

With the backends, the only code that touches processes. A job's processes are found by
the job tag every one of them carries in its environment (``ORCHESTRATE_JOB_ID``), plus the
tree of a known root; psutil does that portably (process trees, environments, waiting on
non-children). The detached supervisor is started here too.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from ..worker import channel

HEARTBEAT_STALE_S = 30.0
DAEMON_MODULE = "orchestrator.supervise.daemon"


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` runs on this host (a zombie does not count)."""
    try:
        p = psutil.Process(pid)
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def send_signal(p: psutil.Process, sig: int) -> None:
    """Send ``sig`` to ``p``; a process that is already gone is not an error."""
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass


def job_processes(job_id: str, root_pid: int | None = None) -> list[psutil.Process]:
    """Every live process of the job: the agent's tree and anything tagged with the job id."""
    found: dict[int, psutil.Process] = {}
    if root_pid:
        try:
            root = psutil.Process(root_pid)
            found[root.pid] = root
            for c in root.children(recursive=True):
                found[c.pid] = c
        except psutil.Error:
            pass
    me = os.getpid()
    for p in psutil.process_iter():
        if p.pid == me or p.pid in found:
            continue
        try:
            if p.environ().get(channel.ENV_JOB_ID) == job_id:
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except psutil.Error:
            continue
    return [p for p in found.values() if p.pid != me]


def rank_pids(job_id: str) -> dict[int, int]:
    """``{global rank: pid}`` of the job's live training ranks (torchrun sets ``RANK`` in each)."""
    out = {}
    for p in job_processes(job_id):
        try:
            rank = p.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and rank.isdigit() and p.status() != psutil.STATUS_ZOMBIE:
            out[int(rank)] = p.pid
    return out


def kill_job_processes(job_id: str, root_pid: int | None, grace_s: float = 10.0) -> list[int]:
    """SIGTERM the job's processes, SIGKILL what is left after ``grace_s``; return survivors' PIDs."""
    procs = job_processes(job_id, root_pid)
    for p in procs:
        send_signal(p, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        send_signal(p, signal.SIGKILL)
    _, alive = psutil.wait_procs(alive, timeout=5)
    # Catch anything spawned while we were killing (a dataloader worker starting up).
    late = [p for p in job_processes(job_id, None) if p.is_running()]
    for p in late:
        send_signal(p, signal.SIGKILL)
    _, late_alive = psutil.wait_procs(late, timeout=5)
    return sorted({p.pid for p in alive + late_alive if pid_alive(p.pid)})


def supervisor_alive(pid: int | None, heartbeat: float | None) -> bool:
    """True if supervisor ``pid`` runs here and its heartbeat is fresh."""
    if not pid:
        return False
    return pid_alive(pid) and (time.time() - (heartbeat or 0)) < HEARTBEAT_STALE_S


def spawn_supervisor(job_id: str, home: Path, run_dir: Path, resume: bool = False) -> int:
    """Start a background supervisor that survives the terminal; return its PID."""
    argv = [sys.executable, "-m", DAEMON_MODULE, job_id] + (["--resume"] if resume else [])
    env = {**os.environ, "ORCHESTRATE_HOME": str(home)}
    env.pop(channel.ENV_JOB_ID, None)
    with open(run_dir / "supervisor.log", "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, cwd=str(run_dir))
    return proc.pid

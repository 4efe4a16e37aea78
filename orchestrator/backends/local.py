"""Local backend: torchrun as a child process in its own session.

torchrun starts each rank in a session of its own, so killing torchrun's process
group does not reach the ranks, and a rank whose agent died is re-parented away
from the tree. Every process of a job therefore carries the job id in its
environment (``ORCHESTRATE_JOB_ID``), and ``kill`` ends the agent's tree plus
every process with that tag, then checks that none is left. psutil does that
portably (process trees, environments, waiting on non-children).
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil

from .. import channel
from .base import AttemptHandle


class LocalBackend:
    name = "local"

    def __init__(self) -> None:
        self._children: dict[tuple[str, int], subprocess.Popen] = {}

    def start(self, plan, attempt: int, resume_from: str | None) -> AttemptHandle:
        paths = plan.paths
        paths.attempt_dir(attempt).mkdir(parents=True, exist_ok=False)
        env = {**os.environ, **plan.attempt_env(attempt, resume_from)}
        with open(paths.agent_log(attempt), "ab") as log:
            proc = subprocess.Popen(
                plan.argv(attempt), env=env, cwd=plan.workdir, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._children[(plan.job_id, attempt)] = proc
        return AttemptHandle(job_id=plan.job_id, attempt=attempt, pid=proc.pid,
                             attempt_dir=str(paths.attempt_dir(attempt)))

    def poll(self, handle: AttemptHandle) -> int | None:
        proc = self._children.get((handle.job_id, handle.attempt))
        if proc is not None:
            return proc.poll()
        # Reattached from another supervisor: not our child, so no wait status.
        if _alive(handle.pid):
            return None
        record = read_agent_record(Path(handle.attempt_dir))
        # No record: the agent itself died without a word (kill -9, OOM killer).
        return record.get("exit_code", -signal.SIGKILL) if record else -signal.SIGKILL

    def signal(self, handle: AttemptHandle, signame: str) -> None:
        sig = signal.Signals[signame]
        # torchrun forwards SIGTERM/SIGINT itself, but not SIGUSR1/2: send to ranks directly.
        targets = job_processes(handle.job_id, handle.pid)
        for p in targets:
            if sig in (signal.SIGTERM, signal.SIGINT) and p.pid != handle.pid:
                continue
            _send(p, sig)

    def kill(self, handle: AttemptHandle, grace_s: float = 10.0) -> list[int]:
        left = kill_job_processes(handle.job_id, handle.pid, grace_s)
        proc = self._children.get((handle.job_id, handle.attempt))
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return left

    def reattach(self, handle: AttemptHandle) -> bool:
        return _alive(handle.pid)


def _alive(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _send(p: psutil.Process, sig: int) -> None:
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
        _send(p, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        _send(p, signal.SIGKILL)
    _, alive = psutil.wait_procs(alive, timeout=5)
    # Catch anything spawned while we were killing (a dataloader worker starting up).
    late = [p for p in job_processes(job_id, None) if p.is_running()]
    for p in late:
        _send(p, signal.SIGKILL)
    _, late_alive = psutil.wait_procs(late, timeout=5)
    return sorted({p.pid for p in alive + late_alive if _alive(p.pid)})


def read_agent_record(attempt_dir: Path) -> dict | None:
    return channel.read_json(Path(attempt_dir) / channel.AGENT_RECORD_FILE)

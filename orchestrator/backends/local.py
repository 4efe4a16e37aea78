"""Local backend: torchrun as a child process in its own session.

torchrun starts each rank in a session of its own, so killing torchrun's process
group does not reach the ranks, and a rank whose agent died is re-parented away
from the tree. Every process of a job therefore carries the job id in its
environment (``ORCHESTRATE_JOB_ID``), and ``kill`` ends the agent's tree plus
every process with that tag, then checks that none is left (:mod:`.processes`).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

from ..worker import channel
from .base import AttemptHandle
from .processes import ProcessId, attempt_root, job_processes, kill_job_processes, send_signal, verified


class LocalBackend:
    """Attempts as local torchrun processes (see the module docstring)."""

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
        ident = ProcessId.of(proc.pid)
        # Which process table the attempt lives in: only that host may probe or signal it (issue 17).
        channel.write_json_atomic(paths.launch_record(attempt), {"host": ident.host, "ns": ident.ns, "pid": proc.pid,
                                                                 "pid_start": ident.start_time})
        return AttemptHandle(job_id=plan.job_id, attempt=attempt, pid=proc.pid,
                             attempt_dir=str(paths.attempt_dir(attempt)), pid_start=ident.start_time,
                             host=ident.host)

    def poll(self, handle: AttemptHandle) -> int | None:
        proc = self._children.get((handle.job_id, handle.attempt))
        if proc is not None:
            return proc.poll()
        # Adopted from another supervisor: not our child, so no wait status.
        ident = _ident(handle)
        if ident is not None and not ident.here():
            return recorded_exit(Path(handle.attempt_dir))   # another host's: never judged by this process table
        if verified(ident, handle.job_id, handle.attempt) is not None:
            return None
        record = read_agent_record(Path(handle.attempt_dir))
        # No record: the agent itself died without a word (kill -9, OOM killer).
        return record.get("exit_code", -signal.SIGKILL) if record else -signal.SIGKILL

    def signal(self, handle: AttemptHandle, signame: str) -> None:
        sig = signal.Signals[signame]
        # torchrun forwards SIGTERM/SIGINT itself, but not SIGUSR1/2: send to ranks directly.
        root = verified(_ident(handle), handle.job_id, handle.attempt)
        for p in job_processes(handle.job_id, _ident(handle), handle.attempt):
            if sig in (signal.SIGTERM, signal.SIGINT) and root is not None and p.pid != root.pid:
                continue
            send_signal(p, sig)

    def kill(self, handle: AttemptHandle, grace_s: float = 10.0) -> list[int]:
        left = kill_job_processes(handle.job_id, _ident(handle), grace_s, attempt=handle.attempt)
        proc = self._children.get((handle.job_id, handle.attempt))
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return left

    def reattach(self, handle: AttemptHandle) -> bool:
        return verified(_ident(handle), handle.job_id, handle.attempt) is not None

    def find(self, plan, attempt: int) -> AttemptHandle | None:
        adir = plan.paths.attempt_dir(attempt)
        root = attempt_root(plan.job_id, attempt)
        if root is not None:
            return AttemptHandle(job_id=plan.job_id, attempt=attempt, pid=root.pid, attempt_dir=str(adir),
                                 pid_start=root.start_time, host=root.host)
        # Nothing runs: it ended already (its records say how) or it never got as far as a process.
        return AttemptHandle(job_id=plan.job_id, attempt=attempt, pid=0, attempt_dir=str(adir)) if adir.is_dir() else None


def _ident(handle: AttemptHandle) -> ProcessId | None:
    if not handle.pid:
        return None
    launched = channel.read_json(Path(handle.attempt_dir) / "launch.json") or {}
    return ProcessId(handle.pid, handle.pid_start, handle.host or socket.gethostname(), launched.get("ns") or "")


def recorded_exit(attempt_dir: Path) -> int:
    """How an attempt of another host ended, by its own records: torchrun's exit record, else rank 0's end
    record, else -SIGKILL (the ranks fell silent with no word: the caller made sure they are silent)."""
    agent = read_agent_record(attempt_dir)
    if agent and "exit_code" in agent:
        return int(agent["exit_code"])
    state = (channel.read_json(Path(attempt_dir) / channel.STATUS_FILE) or {}).get("state")
    return {channel.WORKER_COMPLETED: 0, channel.WORKER_STOPPED: channel.EXIT_STOPPED,
            channel.WORKER_FAILED: 1}.get(state, -signal.SIGKILL)


def read_agent_record(attempt_dir: Path) -> dict | None:
    return channel.read_json(Path(attempt_dir) / channel.AGENT_RECORD_FILE)

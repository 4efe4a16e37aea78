"""Local backend: torchrun as a child process in its own session.

torchrun starts each rank in a session of its own, so killing torchrun's process
group does not reach the ranks, and a rank whose agent died is re-parented away
from the tree. Every process of a job therefore carries the job id in its
environment (``ORCHESTRATE_JOB_ID``), and ``kill`` ends the agent's tree plus
every process with that tag, then checks that none is left (:mod:`.processes`).

While an attempt trains, the next one may be started ahead as a spare whose ranks have done their
imports (:mod:`.spare`); starting that attempt then hands it over instead of starting cold.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from ..worker import channel
from .base import AttemptHandle
from .processes import ProcessId, attempt_root, job_processes, kill_job_processes, send_signal, verified
from .spare import Spare, clear_stale, spare_after_s, start_spare

# The phases (heartbeat.json) of an attempt that got past its start-up: time to prepare the next one.
_STARTED_PHASES = ("training", "saving", "evaluating")


class LocalBackend:
    """Attempts as local torchrun processes (see the module docstring)."""

    name = "local"

    def __init__(self) -> None:
        self._children: dict[tuple[str, int], subprocess.Popen] = {}
        self._plans: dict[str, object] = {}
        self._spares: dict[str, Spare] = {}
        self._training_since: dict[tuple[str, int], float] = {}

    def start(self, plan, attempt: int, resume_from: str | None) -> AttemptHandle:
        paths = plan.paths
        env = self._environ(plan, attempt, resume_from)
        self._plans[plan.job_id] = plan
        spare = self._spares.pop(plan.job_id, None)
        if spare is not None and spare.attempt == attempt and spare.usable(plan.argv(attempt), env):
            spare.hand_over(resume_from)
            proc, ident = spare.proc, spare.ident
        else:
            if spare is not None:
                spare.discard()
            clear_stale(paths.attempt_dir(attempt))
            paths.attempt_dir(attempt).mkdir(parents=True, exist_ok=False)
            with open(paths.agent_log(attempt), "ab") as log:
                proc = subprocess.Popen(
                    plan.argv(attempt), env=env, cwd=plan.workdir, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            ident = ProcessId.of(proc.pid)
        self._children[(plan.job_id, attempt)] = proc
        # Which process table the attempt lives in: only that host may probe or signal it (issue 17).
        channel.write_json_atomic(paths.launch_record(attempt), {"host": ident.host, "ns": ident.ns, "pid": proc.pid,
                                                                 "pid_start": ident.start_time})
        return AttemptHandle(job_id=plan.job_id, attempt=attempt, pid=proc.pid,
                             attempt_dir=str(paths.attempt_dir(attempt)), pid_start=ident.start_time,
                             host=ident.host)

    @staticmethod
    def _environ(plan, attempt: int, resume_from: str | None) -> dict[str, str]:
        """The whole environment of an attempt's processes (a spare's too, but its resume point)."""
        return {**os.environ, **plan.attempt_env(attempt, resume_from)}

    def _prepare_next(self, handle: AttemptHandle) -> None:
        """Start the next attempt as a spare once this one has trained long enough (see :mod:`.spare`)."""
        after = spare_after_s()
        plan = self._plans.get(handle.job_id)
        if after is None or plan is None or handle.job_id in self._spares:
            return
        key = (handle.job_id, handle.attempt)
        if key not in self._training_since:
            beat = channel.read_json(Path(handle.attempt_dir) / channel.HEARTBEAT_FILE) or {}
            if beat.get("phase") not in _STARTED_PHASES:
                return
            self._training_since[key] = time.monotonic()
        if time.monotonic() - self._training_since[key] < after:
            return
        nxt = handle.attempt + 1
        adir = plan.paths.attempt_dir(nxt)
        if adir.exists():
            return
        try:
            self._spares[handle.job_id] = start_spare(handle.job_id, nxt, adir, plan.argv(nxt),
                                                      self._environ(plan, nxt, None), plan.workdir,
                                                      plan.paths.agent_log(nxt))
        except OSError:   # a full or read-only disk: the next attempt starts cold, as without spares
            self._plans.pop(handle.job_id, None)

    def discard_spares(self, job_id: str) -> None:
        """The job ended (or left this supervisor): no next attempt will use its spare."""
        spare = self._spares.pop(job_id, None)
        if spare is not None:
            spare.discard()

    def poll(self, handle: AttemptHandle) -> int | None:
        proc = self._children.get((handle.job_id, handle.attempt))
        if proc is not None:
            rc = proc.poll()
            if rc is None:
                self._prepare_next(handle)
            return rc
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

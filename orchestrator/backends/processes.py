"""Processes of the orchestrator's own: finding, probing, signalling and starting them.

With the backends, the only code that touches processes. Nothing is ever signalled
unless it is provably the job's: a stored PID counts only together with its start time
and the job tag (``ORCHESTRATE_JOB_ID``) in its environment (a PID reused after a reboot
or a long time fails that test); every other process is found by the job tag (and the
attempt number, ``ORCHESTRATE_ATTEMPT``) itself. psutil does that portably (process trees,
environments, waiting on non-children), and its ``Process`` objects refuse to signal a PID
that was reused after they were found.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..store.liveness import namespace_id, same_process_table
from ..worker import channel

DAEMON_MODULE = "orchestrator.supervise.daemon"
ENV_HANDOFF = "ORCHESTRATE_HANDOFF"   # the lease token a detached supervisor may take the lease with


@dataclass(frozen=True)
class ProcessId:
    """A process as the ledger stores it: PID, its start time and its host (and PID namespace, when known)."""

    pid: int
    start_time: float | None
    host: str
    ns: str = ""

    @classmethod
    def of(cls, pid: int) -> "ProcessId":
        """The identity of a live process of this host (a child just started)."""
        try:
            start = psutil.Process(pid).create_time()
        except psutil.Error:
            start = None
        return cls(pid, start, socket.gethostname(), namespace_id())

    def here(self) -> bool:
        """This host's process table holds it: only then may a PID be probed or signalled."""
        return same_process_table(self.host, self.ns)


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` runs on this host (a zombie does not count)."""
    try:
        p = psutil.Process(pid)
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def send_signal(p: psutil.Process, sig: int) -> None:
    """Send ``sig`` to ``p``; a process that is already gone (or whose PID was reused) is not an error."""
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass


def _tagged(p: psutil.Process, job_id: str, attempt: int | None) -> bool:
    env = p.environ()
    if env.get(channel.ENV_JOB_ID) != job_id:
        return False
    return attempt is None or env.get(channel.ENV_ATTEMPT) == str(attempt)


def verified(ident: ProcessId | None, job_id: str, attempt: int | None = None) -> psutil.Process | None:
    """The process ``ident`` names if PID, start time and job tag all match (and it is of this host)."""
    if ident is None or not ident.pid or ident.start_time is None or not ident.here():
        return None
    try:
        p = psutil.Process(ident.pid)
        if abs(p.create_time() - ident.start_time) > 0.01 or p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p if _tagged(p, job_id, attempt) else None
    except psutil.Error:
        return None


def job_processes(job_id: str, root: ProcessId | None = None, attempt: int | None = None) -> list[psutil.Process]:
    """Every live process of the job (of one ``attempt``, if given): the verified root's tree and
    every process carrying the job tag, with their trees."""
    found: dict[int, psutil.Process] = {}
    me = os.getpid()

    def add_tree(p: psutil.Process) -> None:
        found[p.pid] = p
        try:
            for c in p.children(recursive=True):
                found.setdefault(c.pid, c)
        except psutil.Error:
            pass

    root_proc = verified(root, job_id, attempt)
    if root_proc is not None:
        add_tree(root_proc)
    for p in psutil.process_iter():
        if p.pid == me or p.pid in found:
            continue
        try:
            if _tagged(p, job_id, attempt):
                add_tree(p)
        except psutil.Error:
            continue
    return [p for p in found.values() if p.pid != me]


def attempt_root(job_id: str, attempt: int) -> ProcessId | None:
    """The agent (topmost process) of a running attempt, found by its tags: for an attempt whose
    supervisor died after starting it but before recording its PID."""
    procs = {p.pid: p for p in job_processes(job_id, attempt=attempt)}
    for p in procs.values():
        try:
            if p.ppid() not in procs and p.status() != psutil.STATUS_ZOMBIE:
                return ProcessId(p.pid, p.create_time(), socket.gethostname(), namespace_id())
        except psutil.Error:
            continue
    return None


def rank_pids(job_id: str) -> dict[int, int]:
    """``{global rank: pid}`` of the job's live training ranks (torchrun sets ``RANK`` in each), those of
    its oldest attempt still running (the next one may already wait as a spare: ``backends/spare.py``)."""
    by_attempt: dict[str, dict[int, int]] = {}
    for p in job_processes(job_id):
        try:
            env = p.environ()
            rank = env.get("RANK")
            if rank is not None and rank.isdigit() and p.status() != psutil.STATUS_ZOMBIE:
                by_attempt.setdefault(env.get(channel.ENV_ATTEMPT) or "", {})[int(rank)] = p.pid
        except psutil.Error:
            continue
    if not by_attempt:
        return {}
    return by_attempt[min(by_attempt, key=lambda a: int(a) if a.isdigit() else 0)]


def kill_job_processes(job_id: str, root: ProcessId | None = None, grace_s: float = 10.0,
                       attempt: int | None = None) -> list[int]:
    """SIGTERM the job's processes (of one ``attempt``, if given), SIGKILL what is left after
    ``grace_s``; return the PIDs still alive."""
    procs = job_processes(job_id, root, attempt)
    for p in procs:
        send_signal(p, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        send_signal(p, signal.SIGKILL)
    _, alive = psutil.wait_procs(alive, timeout=5)
    # Catch anything spawned while we were killing (a dataloader worker starting up).
    late = [p for p in job_processes(job_id, None, attempt) if p.is_running()]
    for p in late:
        send_signal(p, signal.SIGKILL)
    _, late_alive = psutil.wait_procs(late, timeout=5)
    return sorted({p.pid for p in alive + late_alive if pid_alive(p.pid)})


def spawn_supervisor(job_id: str, home: Path, run_dir: Path, resume: bool = False,
                     handoff_token: str | None = None) -> int:
    """Start a background supervisor that survives the terminal; return its PID.

    ``handoff_token``: the lease token of the process handing the job over; the new supervisor
    takes the lease with it (passed in the environment, which only the user can read).
    """
    argv = [sys.executable, "-m", DAEMON_MODULE, job_id] + (["--resume"] if resume else [])
    env = {**os.environ, "ORCHESTRATE_HOME": str(home)}
    env.pop(channel.ENV_JOB_ID, None)
    env.pop(ENV_HANDOFF, None)
    if handoff_token:
        env[ENV_HANDOFF] = handoff_token
    with open(Path(run_dir) / "supervisor.log", "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, cwd=str(run_dir))
    return proc.pid


def spawn_module(python: str, module: str, args: list[str], log: Path, env: dict | None = None) -> int:
    """Start ``python -m module args`` in a session of its own that outlives its parent (output to ``log``),
    without the job tag (it is never taken for one of the job's processes); return its PID."""
    full = {**os.environ, **(env or {})}
    full.pop(channel.ENV_JOB_ID, None)
    with open(log, "ab") as out:
        proc = subprocess.Popen([python, "-m", module, *args], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=full)
    return proc.pid


def run_command(argv: list[str], stdin_text: str, timeout_s: float, env: dict | None = None) -> tuple[int, str]:
    """Run a user's command (an argv list, never a shell) with ``stdin_text`` on its stdin, to its end or
    ``timeout_s``; ``(exit code, its output's last lines)``, 124 on timeout, 127 if it cannot start."""
    full = {**os.environ, **(env or {})}
    full.pop(channel.ENV_JOB_ID, None)
    try:
        r = subprocess.run(argv, input=stdin_text, capture_output=True, text=True, timeout=timeout_s, env=full)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout_s:.0f} s"
    except OSError as exc:
        return 127, str(exc)
    return r.returncode, "\n".join((r.stdout + r.stderr).strip().splitlines()[-5:])


def run_module(python: str, module: str, args: list[str], timeout_s: float = 600.0,
               env: dict | None = None) -> tuple[int, str, str]:
    """Run ``python -m module args`` to its end (a check the orchestrator must not do in-process, e.g. one
    that imports torch); ``(exit code, stdout, stderr)``, exit code 124 on timeout."""
    try:
        r = subprocess.run([python, "-m", module, *args], capture_output=True, text=True, timeout=timeout_s,
                           stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as exc:
        return 124, str(exc.stdout or ""), f"timed out after {timeout_s:.0f} s"
    return r.returncode, r.stdout, r.stderr

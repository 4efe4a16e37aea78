"""The next attempt, started ahead: a spare torchrun whose ranks have done their imports (issue 18.3).

While attempt N trains, the local backend starts attempt N+1's torchrun as a *spare*: the same command
and environment as N+1 will have (its job and attempt tags included, so every process of it is found,
signalled and killed as the job's), plus ``ORCHESTRATE_SPARE``. Its ranks import torch, transformers,
TRL and datasets, then wait (``orchestrator/worker/spare.py``). If N fails, starting N+1 is a file
write (``go.json``: the checkpoint to resume from) instead of a cold start of every process. A spare
that is not used (the job ended, the plan changed) is killed and its directory removed; one left by
a supervisor that died exits by itself, and its directory is moved aside by the next start.

When: once the current attempt has trained for ``$ORCHESTRATE_SPARE_AFTER_S`` seconds (default 30; a
job that ends sooner never pays for a spare; ``off`` never starts one). A spare costs the memory of
the imports in each rank and their CPU time once per attempt.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..worker import channel
from ..worker.spare import ENV_SPARE, GO_FILE, SPARE_FILE
from .processes import ProcessId, kill_job_processes

ENV_SPARE_AFTER_S = "ORCHESTRATE_SPARE_AFTER_S"
DEFAULT_AFTER_S = 30.0
ASIDE = ".spares"


def spare_after_s(environ=None) -> float | None:
    """Seconds of training before a spare is started; ``None``: never."""
    value = (os.environ if environ is None else environ).get(ENV_SPARE_AFTER_S, "").strip().lower()
    if value in ("off", "no", "false", "never"):
        return None
    try:
        return max(0.0, float(value)) if value else DEFAULT_AFTER_S
    except ValueError:
        return DEFAULT_AFTER_S


@dataclass
class Spare:
    """A started spare: attempt ``attempt`` of ``job_id``, its agent process and what it was started with."""

    job_id: str
    attempt: int
    proc: subprocess.Popen
    ident: ProcessId
    attempt_dir: Path
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]

    def usable(self, argv: list[str], env: dict[str, str]) -> bool:
        """Alive, and started with the command and environment the attempt needs (but the resume point)."""
        return self.proc.poll() is None and self.argv == tuple(argv) and self.env == _key(env)

    def hand_over(self, resume_from: str | None) -> None:
        """The attempt starts now: the ranks go on, resuming from ``resume_from``."""
        now = time.time()
        channel.write_json_atomic(self.attempt_dir / GO_FILE, {
            "env": {channel.ENV_RESUME_FROM: resume_from or channel.RESUME_NONE}, "time": now})
        record = channel.read_json(self.attempt_dir / SPARE_FILE) or {}
        channel.write_json_atomic(self.attempt_dir / SPARE_FILE, {**record, "handed": now})

    def discard(self) -> None:
        """Kill the spare and remove its directory (it never was an attempt)."""
        kill_job_processes(self.job_id, self.ident, grace_s=5.0, attempt=self.attempt)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.attempt_dir, ignore_errors=True)


def _key(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in env.items() if k not in (channel.ENV_RESUME_FROM, ENV_SPARE)))


def start_spare(job_id: str, attempt: int, attempt_dir: Path, argv: list[str], env: dict[str, str], cwd: str,
                log_path: Path) -> Spare:
    """Start attempt ``attempt`` as a spare owned by this process (see the module doc)."""
    me = ProcessId.of(os.getpid())
    attempt_dir.mkdir(parents=True, exist_ok=False)
    channel.write_json_atomic(attempt_dir / SPARE_FILE, {"owner": me.pid, "started": time.time()})
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, env={**env, ENV_SPARE: f"{me.pid}:{me.start_time}"}, cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Spare(job_id, attempt, proc, ProcessId.of(proc.pid), attempt_dir, tuple(argv), _key(env))


def clear_stale(attempt_dir: Path) -> None:
    """An attempt directory a dead supervisor's spare left (never handed over): move it out of the way."""
    record = channel.read_json(attempt_dir / SPARE_FILE)
    if not attempt_dir.is_dir() or not isinstance(record, dict) or record.get("handed"):
        return
    aside = attempt_dir.parent / ASIDE
    aside.mkdir(exist_ok=True)
    os.rename(attempt_dir, aside / f"{attempt_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}")

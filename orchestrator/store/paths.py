"""The one place that knows where a job's files live.

Layout under ``$ORCHESTRATE_HOME`` (default ``~/.orchestrate``)::

    index/<hostname>.db            this host's SQLite index of the jobs (rebuilt from runs/*/ledger/)
    runs/<job_id>/
        config.yaml                the config exactly as submitted
        worker_config.yaml         what the worker reads (no ``launch:``, keys translated)
        plan.json                  the frozen launch plan
        ledger/job.json            the job's record (the truth), ledger/attempt-<n>.json each attempt's
        lease/<gen>.json           who supervises the job (store/lease.py)
        requests/<kind>.json       requests to the job: cancel (its supervisor), checkpoint and stop (its ranks)
        progress.jsonl             the worker's progress records (all attempts)
        output/                    default ``output_dir`` (checkpoints, final model)
        attempts/<n>/
            torchrun.log           the torchrun agent's stdout and stderr
            ranks/                 every rank's stdout/stderr (torchrun --log-dir)
            status.json            the worker's final record for the attempt
            launch.json            where the local backend started it: host, PID namespace, agent PID

Everything under the home is the user's alone: folders 0700, files 0600 (store/private.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..worker.channel import PROGRESS_FILE, STATUS_FILE

ENV_HOME = "ORCHESTRATE_HOME"


def orchestrate_home(environ: dict | None = None) -> Path:
    """``$ORCHESTRATE_HOME`` or ``~/.orchestrate``, absolute."""
    env = os.environ if environ is None else environ
    home = env.get(ENV_HOME) or os.path.join(os.path.expanduser("~"), ".orchestrate")
    return Path(home).expanduser().absolute()


@dataclass(frozen=True)
class RunPaths:
    """Paths of one job's run directory."""

    run_dir: Path

    @classmethod
    def for_job(cls, home: Path, job_id: str) -> "RunPaths":
        return cls(home / "runs" / job_id)

    @property
    def submitted_config(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def worker_config(self) -> Path:
        return self.run_dir / "worker_config.yaml"

    @property
    def plan(self) -> Path:
        return self.run_dir / "plan.json"

    @property
    def progress(self) -> Path:
        return self.run_dir / PROGRESS_FILE

    @property
    def default_output_dir(self) -> Path:
        return self.run_dir / "output"

    def attempt_dir(self, attempt: int) -> Path:
        return self.run_dir / "attempts" / str(attempt)

    def agent_log(self, attempt: int) -> Path:
        return self.attempt_dir(attempt) / "torchrun.log"

    def rank_log_dir(self, attempt: int) -> Path:
        return self.attempt_dir(attempt) / "ranks"

    def status(self, attempt: int) -> Path:
        return self.attempt_dir(attempt) / STATUS_FILE

    def launch_record(self, attempt: int) -> Path:
        """Where the attempt was started (host and PID namespace): which host may judge its processes."""
        return self.attempt_dir(attempt) / "launch.json"

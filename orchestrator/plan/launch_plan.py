"""The frozen plan of one job: everything any of its attempts needs, decided before the first starts.

Plain data plus the pure functions that derive an attempt's command line and environment
from it. Written to ``plan.json`` when the job is created and read back by every
supervisor, so a job's attempts all run what was planned.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..config.launch import RetryPolicy, WatchdogPolicy
from ..store.paths import RunPaths
from ..worker import channel

AGENT_MODULE = "orchestrator.worker.agent"  # torchrun plus a structured exit record


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to start any attempt of one job."""

    job_id: str
    name: str
    backend: str
    device: str                      # "cuda" or "cpu"
    nnodes: int
    nproc_per_node: int
    distributed: str                 # "fsdp", "ddp" or "single"
    python: str
    worker_script: str
    run_dir: str
    workdir: str                     # the submitting directory; the job runs there, like the seed
    output_dir: str
    worker_config: Mapping[str, Any]
    env: Mapping[str, str]
    stop_signal: str
    retry: RetryPolicy
    watchdog: WatchdogPolicy
    notices: tuple[str, ...] = field(default=())
    slurm: Mapping[str, Any] = field(default_factory=dict)  # validated launch.slurm (backend slurm only)
    # issue 6: the fast defaults chosen (performance.py) and the per-GPU memory estimate (memory.py)
    performance: Mapping[str, Any] = field(default_factory=dict)
    script: str | None = None        # issue 13: the user's own script, run by worker_script (the script runner)
    # issue 19: KEY=VALUE given on the command line (a sweep point's keys among them), as typed; and
    # launch.notify (config/notify.py), read when the job ends
    overrides: tuple[str, ...] = field(default=())
    notify: Mapping[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> RunPaths:
        return RunPaths(Path(self.run_dir))

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def torchrun_args(self, attempt: int) -> list[str]:
        """torchrun's own arguments for one attempt (single node; SLURM adds rendezvous)."""
        return [
            "--standalone",  # c10d rendezvous on a free port: concurrent jobs never clash
            f"--nnodes={self.nnodes}",
            f"--nproc-per-node={self.nproc_per_node}",
            "--max-restarts=0",  # restarts are the supervisor's, counted per job
            f"--log-dir={self.paths.rank_log_dir(attempt)}",
            "--redirects=3",
            "--tee=3",
        ]

    def argv(self, attempt: int) -> list[str]:
        """The full command of the attempt's agent process."""
        return [self.python, "-m", AGENT_MODULE, *self.torchrun_args(attempt), *self.worker_args()]

    def worker_args(self) -> list[str]:
        """What torchrun runs on every rank: train_worker.py, or the script runner and the user's script."""
        return [self.worker_script, *([self.script] if self.script else []), "--config", str(self.paths.worker_config)]

    def attempt_env(self, attempt: int, resume_from: str | None) -> dict[str, str]:
        """Variables added to the environment of an attempt."""
        env = dict(self.env)
        env[channel.ENV_ATTEMPT] = str(attempt)
        env[channel.ENV_ATTEMPT_DIR] = str(self.paths.attempt_dir(attempt))
        env[channel.ENV_RESUME_FROM] = resume_from or "none"
        return env

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["worker_config"] = dict(self.worker_config)
        d["env"] = dict(self.env)
        d["notices"] = list(self.notices)
        d["overrides"] = list(self.overrides)
        d["notify"] = dict(self.notify)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LaunchPlan":
        d = dict(d)
        d["retry"] = RetryPolicy(**d["retry"])
        d["watchdog"] = WatchdogPolicy(**d["watchdog"])
        d["notices"] = tuple(d.get("notices", ()))
        d["overrides"] = tuple(d.get("overrides", ()))
        return cls(**d)

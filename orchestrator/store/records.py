"""What the ledger knows about a job and its attempts, as plain records (JSON in, JSON out)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from ..states import JobState

# AttemptRecord.status: written ahead (STARTING) before the backend starts the attempt.
STARTING, RUNNING, ENDED = "STARTING", "RUNNING", "ENDED"


class FencedOut(Exception):
    """A write carried an older lease generation than the job has seen: its writer lost the lease."""


@dataclass
class AttemptRecord:
    """The ledger's record of one attempt of a job."""

    job_id: str
    n: int
    started: float
    ended: float | None = None
    pid: int | None = None
    exit_code: int | None = None
    failure: str | None = None
    resumed_from: str | None = None
    start_step: int | None = None
    end_step: int | None = None
    gained_checkpoint: int | None = None
    message: str | None = None
    status: str | None = None        # STARTING, RUNNING or ENDED (None: written by 0.1)
    pid_start: float | None = None   # the agent process's start time: with pid and host, its identity
    host: str | None = None
    external_id: str | None = None   # the scheduler's id of the attempt (SLURM: "job.step" or the job id)
    scheduler_job_id: str | None = None   # SLURM: the allocation the attempt ran in
    nodes: str | None = None         # SLURM: the nodes it ran on (comma-separated)
    world_size: int | None = None
    in_place: int | None = None      # SLURM: 1 restarted inside the allocation it had, 0 went through the queue

    @property
    def is_open(self) -> bool:
        """Not ended: running, or started by a supervisor that died before recording its end."""
        return self.ended is None

    @property
    def steps_gained(self) -> int | None:
        if self.start_step is None or self.end_step is None:
            return None
        return self.end_step - self.start_step

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "steps_gained": self.steps_gained}

    @classmethod
    def from_json(cls, d: dict) -> "AttemptRecord":
        return cls(**{k: v for k, v in d.items() if k in ATTEMPT_FIELDS})


@dataclass
class Job:
    """A job as the ledger knows it, with its attempts in order."""

    id: str
    name: str
    backend: str
    state: JobState
    created: float
    updated: float
    run_dir: str
    config_path: str
    output_dir: str
    step: int = 0
    max_steps: int | None = None
    distributed_type: str | None = None
    supervisor_pid: int | None = None
    heartbeat: float | None = None
    message: str | None = None
    fence: int = 0
    scheduler_job_id: str | None = None   # SLURM: the allocation the job has now (or waits for)
    final_model: str | None = None        # COMPLETED: the verified Hugging Face folder of the final weights
    group_id: str | None = None           # issue 19: the sweep the job is a point of (store/groups.py)
    attempts: list[AttemptRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "attempts"}
        d["state"] = self.state.value
        d["attempts"] = [a.to_json() for a in self.attempts]
        return d

    def row(self) -> dict[str, Any]:
        """The job's own fields (no attempts), JSON-ready."""
        d = {k: v for k, v in self.__dict__.items() if k != "attempts"}
        d["state"] = self.state.value
        return d

    @classmethod
    def from_json(cls, d: dict, attempts: list[AttemptRecord] | None = None) -> "Job":
        values = {k: v for k, v in d.items() if k in JOB_FIELDS}
        values["state"] = JobState(values["state"])
        return cls(**values, attempts=attempts or [])


ATTEMPT_FIELDS = tuple(f.name for f in fields(AttemptRecord))
JOB_FIELDS = tuple(f.name for f in fields(Job) if f.name != "attempts")


def dumps(job: Job) -> str:
    return json.dumps(job.to_json(), indent=1, sort_keys=True)

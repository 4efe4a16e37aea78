"""``orchestrate checkpoint``'s request and wait (supervise/on_demand.py), against files a worker would write."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.errors import JobError
from orchestrator.states import JobState
from orchestrator.store import requests
from orchestrator.supervise.on_demand import request_checkpoint


@dataclass
class Job:
    id: str
    run_dir: str
    state: JobState


class Ledger:
    def __init__(self, job):
        self.job = job

    def get(self, job_id):
        return self.job


def _worker(run: Path, event: str, **fields):
    """What the worker does on its next step: read the request and answer it in progress.jsonl."""
    def sleep(_):
        asked = requests.pending(run, requests.CHECKPOINT)
        assert asked is not None, "the request is there while the command waits"
        with open(run / "progress.jsonl", "a") as f:
            f.write(json.dumps({"event": "checkpoint", "step": 3, "path": "/old", "requested": asked["time"] - 1}) + "\n")
            f.write(json.dumps({"event": event, "step": 7, "requested": asked["time"], **fields}) + "\n")
    return sleep


def test_the_path_of_the_checkpoint_that_answers_the_request_is_returned(tmp_path):
    job = Job("j1", str(tmp_path), JobState.RUNNING)
    path = request_checkpoint(Ledger(job), job, timeout_s=5, sleep=_worker(tmp_path, "checkpoint", path="/ck-7"))
    assert path == "/ck-7" and requests.pending(tmp_path, requests.CHECKPOINT) is None


def test_a_failed_save_a_job_that_ended_or_no_answer_are_errors(tmp_path):
    job = Job("j1", str(tmp_path), JobState.RUNNING)
    with pytest.raises(JobError, match="the checkpoint at step 7 failed: OSError: boom"):
        request_checkpoint(Ledger(job), job, timeout_s=5, sleep=_worker(tmp_path, "checkpoint_failed",
                                                                         error="OSError: boom"))
    now = [0.0]
    with pytest.raises(JobError, match="no complete checkpoint within 2 s"):
        request_checkpoint(Ledger(job), job, timeout_s=2, sleep=lambda s: now.__setitem__(0, now[0] + s),
                           clock=lambda: now[0])
    assert requests.pending(tmp_path, requests.CHECKPOINT) is None   # withdrawn: no later attempt acts on it
    ended = Job("j1", str(tmp_path), JobState.FAILED)
    with pytest.raises(JobError, match="only a running job"):
        request_checkpoint(Ledger(ended), ended)
    with pytest.raises(JobError, match="ended FAILED before the checkpoint was complete"):
        request_checkpoint(Ledger(ended), job, timeout_s=5, sleep=lambda s: None)

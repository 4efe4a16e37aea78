"""``orchestrate checkpoint JOB``: ask a running job to save now and wait until the save is complete.

The request is a file in the run directory (:mod:`orchestrator.store.requests`), which every host
sees; the worker's callback reads it at each step boundary, every rank agrees to save, and the
checkpoint's record in ``progress.jsonl`` carries the request's time back. Only a complete
checkpoint (every rank's part written, the marker there) is reported as done.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..errors import JobError
from ..states import JobState
from ..store import requests
from ..store.paths import RunPaths
from ..worker.channel import iter_jsonl


def request_checkpoint(ledger, job, timeout_s: float = 900.0, sleep: Callable[[float], None] = time.sleep,
                       clock: Callable[[], float] = time.monotonic) -> str:
    """Ask ``job`` to save at its next step boundary; return the complete checkpoint's path.

    Raises :class:`JobError` when the job is not running, ends first, the save fails or
    ``timeout_s`` passes (the request is withdrawn then, so no later attempt acts on it).
    """
    if job.state not in (JobState.RUNNING, JobState.RESUMING):
        raise JobError(f"{job.id} is {job.state.value}: only a running job can save on demand")
    progress = RunPaths(Path(job.run_dir)).progress
    offset = progress.stat().st_size if progress.exists() else 0
    asked = requests.make_request(job.run_dir, requests.CHECKPOINT)["time"]
    deadline = clock() + timeout_s
    try:
        while clock() < deadline:
            for rec, offset in iter_jsonl(progress, offset):
                if rec.get("requested") != asked:
                    continue
                if rec.get("event") == "checkpoint":
                    return str(rec["path"])
                if rec.get("event") == "checkpoint_failed":
                    raise JobError(f"{job.id}: the checkpoint at step {rec.get('step')} failed: {rec.get('error')}; "
                                   f"the previous complete checkpoint stays the resume point")
            state = ledger.get(job.id).state
            if state.is_terminal:
                raise JobError(f"{job.id} ended {state.value} before the checkpoint was complete")
            sleep(0.5)
        raise JobError(f"{job.id}: no complete checkpoint within {timeout_s:.0f} s (a step or a save takes "
                       f"longer?); the request is withdrawn")
    finally:
        requests.clear(job.run_dir, requests.CHECKPOINT, older_than=asked + 1e-6)

"""The ``next:`` line a job's end prints (dashboard/live.py): it fits how the job ended, and never offers
``resume`` where a rerun of the job's frozen plan would fail the same way (issue 16.7)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator.dashboard.live import final_summary, next_steps
from orchestrator.states import JobState
from orchestrator.store.ledger import AttemptRecord, Job


def job(state: JobState, failures=(), message: str | None = None, final_model: str | None = None) -> Job:
    attempts = [AttemptRecord(job_id="j-1", n=n, started=1.0, ended=2.0, failure=f)
                for n, f in enumerate(failures, start=1)]
    return Job(id="j-1", name="demo", backend="local", state=state, created=1.0, updated=2.0, run_dir="/runs/j-1",
               config_path="/work/cfg.yaml", output_dir="/out", message=message, final_model=final_model,
               attempts=attempts)


def summary(j: Job) -> str:
    return final_summary(SimpleNamespace(job=j, progress=SimpleNamespace(loss=0.5), goodput=None))


@pytest.mark.parametrize("failures,message", [
    (["USER_ERROR"], "the job fails before training starts"),
    (["OOM"], "out of memory"),
    (["COMPLETED"], "training completed, but the final model in /out is not the trained model: ..."),
])
def test_failures_a_rerun_repeats_say_edit_the_config_and_submit_again_never_resume(failures, message):
    text = summary(job(JobState.FAILED, failures, message))
    nxt = text.split("next:", 1)[1]
    assert "edit /work/cfg.yaml and submit again: orchestrate submit /work/cfg.yaml" in nxt
    assert "orchestrate resume" not in text and f"why:         {message}" in text


def test_transient_failures_disk_full_and_cancel_offer_resume():
    for failures in (["CRASHED", "KILLED"], ["STALLED"]):
        assert "orchestrate resume j-1" in next_steps(job(JobState.FAILED, failures))
    assert next_steps(job(JobState.FAILED, ["DISK_FULL"]))[-1] == "free space, then: orchestrate resume j-1"
    assert any(s.startswith("orchestrate resume j-1") for s in next_steps(job(JobState.CANCELLED, ["CANCELLED"])))


def test_a_completed_job_offers_its_model_and_says_when_it_is_not_verified():
    text = summary(job(JobState.COMPLETED, ["COMPLETED"], "completed", final_model="/out"))
    assert "model:       /out  (verified" in text and "why:" not in text
    assert "orchestrate export j-1 --out DIR" in text and "resume" not in text
    text = summary(job(JobState.COMPLETED, ["COMPLETED"], "COMPLETED, final model not verified: x (folder: /out)"))
    assert "model:" not in text and "why:         COMPLETED, final model not verified: x" in text

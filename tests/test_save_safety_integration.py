"""Saves under faults, with real torchrun (issue 10): kills at every point of a save never leave the job
without a complete checkpoint, a slow save is not a hang, and a full disk stops the job cleanly."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from orch_helpers import job_processes, orch, progress, status, submit_small, wait_end, wait_for

from orchestrator.worker.checkpoints import list_checkpoints, newest_complete, verify_checkpoint

pytestmark = pytest.mark.integration

_submit = submit_small


def _wait_state(home, job_id, timeout=420):
    return wait_end(home, job_id, timeout)


class CompleteCheckpointWatch:
    """Samples the output folder every 20 ms: once a complete checkpoint exists, one must always exist."""

    def __init__(self, out: Path):
        self.out, self.seen_one, self.gaps, self.samples = out, False, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _any_complete(self) -> bool:
        """Oldest first, listed again if nothing is found: a checkpoint that vanishes between the listing and
        its check was deleted by a rotation, which runs only after a newer one is complete (see below)."""
        for _ in range(3):
            for step, path in reversed(list_checkpoints(self.out)):
                if verify_checkpoint(path, step).ok:
                    return True
        return False

    def _run(self):
        while not self._stop.wait(0.02):
            good = self._any_complete()
            self.samples += 1
            if good:
                self.seen_one = True
            elif self.seen_one:
                self.gaps.append([(p.name, verify_checkpoint(p, step).reason) for step, p in list_checkpoints(self.out)])

    def stop(self):
        self._stop.set()
        self._thread.join()


# (point, rank): every point of a save, on the rank that acts there (rank 0 writes the marker and rotates).
POINTS = [("start", 1), ("model", 0), ("optimizer", 1), ("rng", 1), ("marker", 0), ("rotate", 0)]


@pytest.mark.parametrize("point, rank", POINTS, ids=[p for p, _ in POINTS])
def test_a_kill_at_any_point_of_a_save_never_leaves_no_complete_checkpoint(tmp_path, demo_assets, point, rank):
    home, job_id = _submit(tmp_path, demo_assets, env={"ORCHESTRATE_SAVE_FAULT": f"kill:{rank}:4:{point}"})
    out = Path(status(home, job_id)["output_dir"])
    watch = CompleteCheckpointWatch(out)
    try:
        job = _wait_state(home, job_id)
    finally:
        watch.stop()
    assert job["state"] == "COMPLETED", job["message"]
    assert watch.seen_one and watch.samples > 100
    assert watch.gaps == [], f"no complete checkpoint on disk at some instant: {watch.gaps[:3]}"
    failures = [a["failure"] for a in job["attempts"]]
    assert failures[0] in ("KILLED", "WORKER_LOST") and failures[-1] == "COMPLETED", failures
    resumed = job["attempts"][1]["resumed_from"]
    # Before the marker the killed save does not count; after it (rotation) it does.
    assert resumed.endswith("checkpoint-4" if point == "rotate" else "checkpoint-2"), (point, resumed)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-8"]   # save_total_limit: 1
    assert job_processes(job_id) == []


def test_a_save_longer_than_the_step_limit_is_not_ended_as_a_hang(tmp_path, demo_assets):
    home, job_id = _submit(tmp_path, demo_assets, env={"ORCHESTRATE_SAVE_FAULT": "sleep:0:4:model:15"},
                           launch={"watchdog": {"stall_floor_s": 5, "stall_factor": 2, "startup_timeout_s": 300,
                                                "save_floor_s": 60}})
    phases = set()

    def saving_seen():
        phases.add(status(home, job_id).get("phase"))
        return "saving" in phases

    wait_for(saving_seen, 300, "status to show the saving phase", interval=0.3)
    job = _wait_state(home, job_id)
    assert job["state"] == "COMPLETED" and [a["failure"] for a in job["attempts"]] == ["COMPLETED"], job["message"]
    saves = [r["save_s"] for r in progress(job["run_dir"]) if r["event"] == "checkpoint" and r["step"] == 4]
    assert saves and saves[0] >= 15


def test_a_full_disk_stops_the_job_and_resume_finishes_it_once_space_is_back(tmp_path, demo_assets):
    home, job_id = _submit(tmp_path, demo_assets, env={"ORCHESTRATE_SAVE_FAULT": "enospc:0:4:optimizer:always"})
    job = _wait_state(home, job_id)
    assert job["state"] == "FAILED" and [a["failure"] for a in job["attempts"]] == ["DISK_FULL"], job["attempts"]
    assert job["message"].startswith("DISK_FULL: disk full in ") and "one checkpoint takes" in job["message"]
    out = Path(job["output_dir"])
    assert newest_complete(out)[0].step == 2, "the complete checkpoint is kept"
    assert [p.name.split(".")[0] for p in (out / ".incomplete").iterdir()] == ["checkpoint-4"]
    r = orch(home, "resume", job_id, cwd=tmp_path, timeout=420)     # "space is back": no fault this time
    assert r.returncode == 0, r.stdout + r.stderr
    job = status(home, job_id)
    assert job["state"] == "COMPLETED" and job["attempts"][-1]["resumed_from"].endswith("checkpoint-2")

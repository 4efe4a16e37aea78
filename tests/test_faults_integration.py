"""Fault injection on real torchrun (2 CPU ranks, FSDP, the tiny demo model).

Each test breaks a running job the way clusters do and asserts that the job still
ends COMPLETED at the right step, and that no step before the checkpoint an attempt
resumed from was trained again by that attempt.
"""
from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
from orch_helpers import orch, progress, status, wait_for, write_config

from orchestrator.backends.processes import rank_pids

pytestmark = pytest.mark.integration

MAX_STEPS = 30
FAST_RETRY = {"retry": {"backoff_s": 0.5, "max_restarts": 6}, "watchdog": {"stall_floor_s": 8, "stall_factor": 5,
                                                        "startup_timeout_s": 300}}


def _config(tmp_path, assets, launch=None, **kw):
    opts = dict(max_steps=MAX_STEPS, save_steps=5, logging_steps=1)
    opts.update(kw)
    return write_config(tmp_path, assets, launch={**FAST_RETRY, **(launch or {})}, **opts)


def _detach(home, cfg, cwd, env_extra=None) -> str:
    r = orch(home, "submit", "--detach", str(cfg), cwd=cwd, env_extra=env_extra, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _wait_state(home, job_id, states=("COMPLETED", "FAILED", "CANCELLED"), timeout=420) -> dict:
    return wait_for(lambda: (lambda j: j if j["state"] in states else None)(status(home, job_id)),
                    timeout, f"job {job_id} to reach {states}", interval=0.5)


def _checkpoint_at_least(run_dir, step, attempt=None) -> dict | None:
    for r in progress(run_dir):
        if r["event"] == "checkpoint" and r["step"] >= step and (attempt is None or r["attempt"] == attempt):
            return r
    return None


def _rank_pid(job_id: str, rank: int) -> int | None:
    return rank_pids(job_id).get(rank)


def _step_of(path: str | None) -> int:
    m = re.search(r"checkpoint-(\d+)$", path or "")
    return int(m.group(1)) if m else 0


def assert_failures(job: dict, *caused: str) -> None:
    """The attempts ended as the test caused them to, then COMPLETED.

    gloo on CPU very rarely segfaults on its own while gathering a checkpoint (seen once
    in ~60 attempts); such an extra attempt is a transient failure the supervisor must
    absorb too, so it is allowed between the caused ones and the completion.
    """
    got = [a["failure"] for a in job["attempts"]]
    assert got[:len(caused)] == list(caused), got
    assert got[-1] == "COMPLETED", got
    assert set(got[len(caused):-1]) <= {"KILLED", "CRASHED", "WORKER_LOST"}, got


def assert_completed_without_lost_work(job: dict) -> None:
    assert job["state"] == "COMPLETED", job
    assert job["step"] == MAX_STEPS
    logs = [r for r in progress(job["run_dir"]) if r["event"] == "log"]
    for a in job["attempts"]:
        mine = [r["step"] for r in logs if r["attempt"] == a["n"]]
        resumed = _step_of(a["resumed_from"])
        assert all(s > resumed for s in mine), f"attempt {a['n']} redid steps before {a['resumed_from']}"
        if a["n"] > 1:
            assert mine and mine[0] == resumed + 1, (a, mine[:3])
    assert max(r["step"] for r in logs) == MAX_STEPS
    counts = {}
    for r in logs:
        counts[r["step"]] = counts.get(r["step"], 0) + 1
    assert max(counts.values()) <= 2, "a step was trained more than twice"


def test_a_kill_9_of_one_rank(tmp_path, demo_assets):
    home = tmp_path / "home"
    job_id = _detach(home, _config(tmp_path, demo_assets), tmp_path)
    run_dir = status(home, job_id)["run_dir"]
    wait_for(lambda: _checkpoint_at_least(run_dir, 10), 300, "checkpoint 10")
    os.kill(wait_for(lambda: _rank_pid(job_id, 1), 30, "rank 1"), signal.SIGKILL)
    job = _wait_state(home, job_id)
    assert_failures(job, "KILLED")
    assert _step_of(job["attempts"][1]["resumed_from"]) >= 10
    assert_completed_without_lost_work(job)


def test_b_kill_9_of_the_torchrun_agent(tmp_path, demo_assets):
    home = tmp_path / "home"
    job_id = _detach(home, _config(tmp_path, demo_assets), tmp_path)
    run_dir = status(home, job_id)["run_dir"]
    wait_for(lambda: _checkpoint_at_least(run_dir, 10), 300, "checkpoint 10")
    os.kill(status(home, job_id)["attempts"][0]["pid"], signal.SIGKILL)
    job = _wait_state(home, job_id)
    assert_failures(job, "WORKER_LOST")
    assert_completed_without_lost_work(job)


def test_c_sigterm_to_the_job_is_a_graceful_preemption(tmp_path, demo_assets):
    home = tmp_path / "home"
    job_id = _detach(home, _config(tmp_path, demo_assets, save_steps=100), tmp_path)
    run_dir = status(home, job_id)["run_dir"]
    wait_for(lambda: any(r["event"] == "log" and r["step"] >= 8 for r in progress(run_dir)), 300, "step 8")
    os.kill(status(home, job_id)["attempts"][0]["pid"], signal.SIGTERM)
    job = _wait_state(home, job_id)
    assert_failures(job, "PREEMPTED")
    stopped_at = job["attempts"][0]["end_step"]
    # The stop saved a checkpoint at the step where it happened, although save_steps is 100.
    assert _step_of(job["attempts"][1]["resumed_from"]) == stopped_at >= 8
    assert_completed_without_lost_work(job)


def test_d_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, demo_assets):
    home = tmp_path / "home"
    cfg = _config(tmp_path, demo_assets, launch={"watchdog": {"stall_floor_s": 120, "startup_timeout_s": 300}})
    # Rank 1 is held at step 13 (attempt 1 only); the newest checkpoint rots; then rank 1 dies. (A lost rank's
    # first retry starts at once, so the rot comes before the death, not during a backoff.)
    job_id = _detach(home, cfg, tmp_path, env_extra={"ORCHESTRATE_FAULT": "hang:1:13"})
    run_dir = status(home, job_id)["run_dir"]
    wait_for(lambda: _checkpoint_at_least(run_dir, 10), 300, "checkpoint 10")
    ckpt = Path(status(home, job_id)["output_dir"]) / "checkpoint-10"
    # the model's weights: one shard per rank (sharded, the default) or model.safetensors (FULL_STATE_DICT)
    newest = max([*ckpt.glob("pytorch_model_fsdp_0/*.distcp"), *ckpt.glob("model.safetensors")],
                 key=lambda f: f.stat().st_size)
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    os.kill(wait_for(lambda: _rank_pid(job_id, 1), 30, "rank 1"), signal.SIGKILL)
    job = _wait_state(home, job_id)
    assert_failures(job, "KILLED")
    assert job["attempts"][1]["resumed_from"].endswith("checkpoint-5")
    assert_completed_without_lost_work(job)
    log = (Path(run_dir) / "supervisor.log").read_text()
    assert "skipping checkpoint-10" in log


def test_e_a_rank_that_stops_making_progress_is_stalled_killed_and_resumed(tmp_path, demo_assets):
    home = tmp_path / "home"
    job_id = _detach(home, _config(tmp_path, demo_assets), tmp_path, env_extra={"ORCHESTRATE_FAULT": "hang:1:12"})
    job = _wait_state(home, job_id)
    assert_failures(job, "STALLED")
    assert_completed_without_lost_work(job)


def test_f_supervisor_killed_then_resume_reattaches(tmp_path, demo_assets):
    home = tmp_path / "home"
    job_id = _detach(home, _config(tmp_path, demo_assets, max_steps=MAX_STEPS), tmp_path)
    run_dir = status(home, job_id)["run_dir"]
    wait_for(lambda: any(r["event"] == "log" for r in progress(run_dir)), 300, "first step")
    os.kill(status(home, job_id)["supervisor_pid"], signal.SIGKILL)
    r = orch(home, "resume", job_id, cwd=tmp_path, timeout=420)
    assert r.returncode == 0, r.stdout + r.stderr
    job = status(home, job_id)
    assert [a["failure"] for a in job["attempts"]] == ["COMPLETED"], "no second copy of the attempt"
    assert_completed_without_lost_work(job)


def test_g_user_error_fails_once_and_names_the_cause(tmp_path, demo_assets):
    home = tmp_path / "home"
    data = tmp_path / "bad-data"
    data.mkdir()
    from orchestrator.worker.data import PEEK_ROWS

    # beyond the rows validate reads (those would stop the submit with exit 2): only the worker sees it
    rows = (demo_assets / "data" / "train_dataset.json").read_text().splitlines()[:PEEK_ROWS + 20]
    rows[PEEK_ROWS + 7] = json.dumps({"text": "a row without messages"})
    (data / "train_dataset.json").write_text("\n".join(rows) + "\n")
    cfg = _config(tmp_path, demo_assets, dataset_path=str(data))
    r = orch(home, "submit", str(cfg), cwd=tmp_path, timeout=300)
    assert r.returncode == 1
    job = status(home, json.loads(orch(home, "list", "--json").stdout)[0]["id"])
    assert job["state"] == "FAILED"
    assert [a["failure"] for a in job["attempts"]] == ["USER_ERROR"]
    assert "messages" in job["attempts"][0]["message"] and "train_dataset.json" in job["attempts"][0]["message"]
    assert "not retried" in job["message"]


def test_h_three_kills_give_bit_identical_final_weights(tmp_path, demo_assets):
    import torch
    from safetensors.torch import load_file

    home = tmp_path / "home"
    ref_cfg = _config(tmp_path, demo_assets, output_dir=str(tmp_path / "ref"))
    r = orch(home, "submit", str(ref_cfg), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (tmp_path / "faulty.yaml").write_text(ref_cfg.read_text().replace(str(tmp_path / "ref"), str(tmp_path / "faulty")))
    job_id = _detach(home, tmp_path / "faulty.yaml", tmp_path)
    run_dir = status(home, job_id)["run_dir"]
    for attempt in (1, 2, 3):
        wait_for(lambda: _checkpoint_at_least(run_dir, 0, attempt=attempt), 300, f"a checkpoint in attempt {attempt}")
        pid = wait_for(lambda: _rank_pid(job_id, attempt % 2), 30, "a rank")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len(status(home, job_id)["attempts"]) > attempt, 120, f"attempt {attempt + 1}")
    job = _wait_state(home, job_id)
    assert_failures(job, "KILLED", "KILLED", "KILLED")
    assert_completed_without_lost_work(job)
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
    got = load_file(str(tmp_path / "faulty" / "model.safetensors"))
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), f"{name} differs from the uninterrupted run"

"""Evaluation and goodput on a real job (issues 16.2 and 20): 2 CPU ranks, epochs with evaluation, kill -9.

One job proves both features: it trains two epochs of the demo data with an evaluation and a
checkpoint at each epoch's end; rank 1 is killed with SIGKILL after the first checkpoint, a few
steps into the second epoch, and the job resumes and completes. Then:

* ``status --json`` has ``last_eval`` and ``best_eval`` with their steps, every metric the trainer
  reported, and the table and the detail view show the eval loss;
* the goodput account's parts add up to the wall time (within 1 %), and its lost progress equals
  the time attempt 1 spent on the steps attempt 2 trained again, within one step;
* ``orchestrate report`` draws it (eval points, the attempts' timeline).
"""
from __future__ import annotations

import json
import os
import signal
import statistics
from pathlib import Path

import pytest
from orch_helpers import orch, progress, status, submit_detached, wait_end, wait_for

from orchestrator.backends.processes import rank_pids
from orchestrator.worker import channel

pytestmark = pytest.mark.integration

LAUNCH = {"retry": {"backoff_s": 0.5, "max_restarts": 3}, "watchdog": {"startup_timeout_s": 300}}
TRAINING = dict(max_steps=-1, num_train_epochs=2, eval_strategy="epoch", save_strategy="epoch", logging_steps=1,
                per_device_eval_batch_size=8)


def _kill_point(run_dir):
    """After attempt 1's first checkpoint record, two steps further: (checkpoint step, rank 1's pid)."""
    recs = progress(run_dir)
    ckpt = next((r["step"] for r in recs if r["event"] == "checkpoint" and r["attempt"] == 1), None)
    logged = max((r["step"] for r in recs if r["event"] == "log" and r["attempt"] == 1), default=0)
    return ckpt is not None and logged >= ckpt + 2


def _redone_time(recs, resume_step):
    """Seconds attempt 1 trained past ``resume_step`` by its own log records (saves and evaluations taken out),
    and its median step time."""
    logs = {r["step"]: r["time"] for r in recs if r["event"] == "log" and r["attempt"] == 1}
    steps = sorted(logs)
    durations = [logs[b] - logs[a] for a, b in zip(steps, steps[1:]) if b == a + 1]
    last = steps[-1]
    overhead = sum(r.get("eval_s") or 0 for r in recs if r["event"] == "eval" and r["attempt"] == 1
                   and resume_step <= r["step"] < last)
    overhead += sum(r.get("save_s") or 0 for r in recs if r["event"] == "checkpoint" and r["attempt"] == 1
                    and resume_step <= r["step"] < last)
    return logs[last] - logs[resume_step] - overhead, statistics.median(durations), last


def test_a_killed_job_with_evaluation_shows_its_eval_and_accounts_for_every_second(tmp_path, demo_assets):
    home, job_id = submit_detached(tmp_path, demo_assets, LAUNCH, **TRAINING)
    run_dir = status(home, job_id)["run_dir"]
    wait_for(lambda: _kill_point(run_dir), 300, "two steps after attempt 1's first checkpoint")
    os.kill(wait_for(lambda: rank_pids(job_id).get(1), 30, "rank 1"), signal.SIGKILL)
    job = wait_end(home, job_id)
    assert job["state"] == "COMPLETED", job["message"]
    assert [a["failure"] for a in job["attempts"]][0] == "KILLED"
    recs = progress(run_dir)
    last_step = job["step"]

    # evaluation: the records, --json, the detail view and the table
    evals = [r for r in recs if r["event"] == "eval"]
    assert evals and all(isinstance(r["eval_s"], float) and r["epoch"] for r in evals)
    assert {"eval_loss", "eval_runtime"} <= set(evals[-1]["metrics"])
    assert job["last_eval"]["step"] == last_step and job["last_eval"]["eval_loss"] == evals[-1]["metrics"]["eval_loss"]
    best = min((r for r in evals if r["attempt"] == 2 or r["step"] <= job["attempts"][1]["start_step"]),
               key=lambda r: r["metrics"]["eval_loss"])
    assert job["best_eval"] == {"step": best["step"], "eval_loss": best["metrics"]["eval_loss"]}
    detail = orch(home, "status", job_id, "--once", timeout=60).stdout
    assert f"last {evals[-1]['metrics']['eval_loss']:.4f} (step {last_step})" in detail and "goodput" in detail
    table = orch(home, "status", "--once", timeout=60).stdout
    row = next(line for line in table.splitlines() if line.startswith(job_id))
    assert f"{evals[-1]['metrics']['eval_loss']:.4f}" in row and f"{100 * job['goodput']['fraction']:.0f}%" in row

    # goodput: every second once, and the lost progress is the steps trained twice
    g = job["goodput"]
    assert g["goodput_s"] + sum(g["badput_s"].values()) == pytest.approx(g["wall_s"], rel=0.01)
    assert g["wall_s"] == pytest.approx(job["updated"] - job["created"], rel=0.01)
    resume_step = job["attempts"][1]["start_step"]
    redone, median_step, killed_after = _redone_time(recs, resume_step)
    print(f"\nlost {g['badput_s']['lost']:.2f} s; attempt 1 trained steps {resume_step + 1}-{killed_after} in "
          f"{redone:.2f} s (median step {median_step:.2f} s); account: {json.dumps(g['badput_s'])}")
    assert redone > 0 and abs(g["badput_s"]["lost"] - redone) <= median_step + 0.05
    one, two = g["attempts"]
    assert one["steps"] == {"kept": resume_step, "lost": killed_after - resume_step}
    assert two["steps"]["lost"] == 0 and two["badput_s"]["restore"] > 0 and one["step_time"]["median_s"] > 0
    assert g["gpu_hours"]["total"] == pytest.approx(2 * g["wall_s"] / 3600, rel=0.01)
    kept = wait_for(lambda: channel.read_json(Path(run_dir) / "goodput.json"), 30, "goodput.json")  # the supervisor's
    assert kept["account"]["wall_s"] == g["wall_s"] and kept["job_updated"] == job["updated"]

    pytest.importorskip("matplotlib")
    r = orch(home, "report", job_id, timeout=120)
    assert r.returncode == 0 and open(r.stdout.strip(), "rb").read(8) == b"\x89PNG\r\n\x1a\n"

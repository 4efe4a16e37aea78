"""`orchestrate submit` end to end: real torchrun, 2 CPU ranks, FSDP, the tiny demo model."""
from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
from orch_helpers import job_processes, orch, progress, single_job_id, start_orch, status, wait_for, write_config

pytestmark = pytest.mark.integration


def test_demo_config_runs_to_completion_under_fsdp(tmp_path, demo_assets):
    """The shipped demo config, submitted from a directory holding .demo, completes under real FSDP."""
    home = tmp_path / "home"
    (tmp_path / ".demo").symlink_to(demo_assets)
    cfg = write_config(tmp_path, demo_assets, name="demo", max_steps=12, save_steps=4, logging_steps=2)
    r = orch(home, "submit", str(cfg), cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    job = status(home, single_job_id(home))
    assert job["state"] == "COMPLETED"
    assert job["step"] == job["max_steps"] == 12
    assert job["distributed_type"] == "FSDP" and job["fsdp_version"] == 2 and job["world_size"] == 2
    assert [a["failure"] for a in job["attempts"]] == ["COMPLETED"]
    recs = progress(job["run_dir"])
    logs = [r for r in recs if r["event"] == "log"]
    assert [r["step"] for r in logs] == [2, 4, 6, 8, 10, 12]
    assert all(math.isfinite(r["loss"]) for r in logs)
    out = Path(job["output_dir"])
    assert (out / "model.safetensors").stat().st_size > 0
    for step in (4, 8, 12):
        assert (out / f"checkpoint-{step}" / ".orchestrate-complete").is_file()
    ranks = sorted(p.parent.name for p in Path(job["run_dir"]).glob("attempts/1/ranks/**/stdout.log"))
    assert ranks == ["0", "1"], "every rank's output is kept"


def test_detach_prints_only_the_job_id_and_cancel_leaves_no_process(tmp_path, demo_assets):
    home = tmp_path / "home"
    cfg = write_config(tmp_path, demo_assets, max_steps=400, save_steps=1000, logging_steps=1)
    r = orch(home, "submit", "--detach", str(cfg), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert r.stdout == job_id + "\n"
    run_dir = status(home, job_id)["run_dir"]
    wait_for(lambda: any(x["event"] == "log" for x in progress(run_dir)), 120, "the first training step")
    assert len(job_processes(job_id)) >= 3  # the torchrun agent and 2 ranks carry the job tag
    r = orch(home, "cancel", job_id, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert status(home, job_id)["state"] == "CANCELLED"
    assert job_processes(job_id) == []


def test_ctrl_c_in_the_foreground_cancels_the_whole_tree(tmp_path, demo_assets):
    home = tmp_path / "home"
    cfg = write_config(tmp_path, demo_assets, max_steps=400, save_steps=1000, logging_steps=1)
    proc = start_orch(home, "submit", str(cfg), cwd=tmp_path)
    job_id = wait_for(lambda: _job_id_if_any(home), 60, "the job in the ledger")
    run_dir = status(home, job_id)["run_dir"]
    wait_for(lambda: any(x["event"] == "log" for x in progress(run_dir)), 120, "the first training step")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert status(home, job_id)["state"] == "CANCELLED"
    assert job_processes(job_id) == []


def test_second_job_on_the_same_output_dir_is_refused(tmp_path, demo_assets):
    home = tmp_path / "home"
    out = tmp_path / "out"
    cfg = write_config(tmp_path, demo_assets, max_steps=4, save_steps=2, logging_steps=2, output_dir=str(out))
    assert orch(home, "submit", str(cfg), cwd=tmp_path, timeout=240).returncode == 0
    before = sorted(p.name for p in out.iterdir())
    for verb in (["validate"], ["submit", "--dry-run"], ["submit"]):   # validate says what submit would
        r = orch(home, *verb, str(cfg), cwd=tmp_path, timeout=120)
        assert r.returncode == 2, verb
        # the owner COMPLETED ('resume' would answer "already completed"): the advice is what works
        assert "holds the checkpoints of job" in r.stderr and "which COMPLETED" in r.stderr, r.stderr
        assert "resume_from_checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == before
    assert len(json.loads(orch(home, "list", "--json").stdout)) == 1


def _job_id_if_any(home):
    r = orch(home, "list", "--json", timeout=60)
    jobs = json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else []
    return jobs[0]["id"] if jobs else None

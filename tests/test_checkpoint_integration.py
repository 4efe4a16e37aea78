"""Sharded, asynchronous, timed and on-demand checkpoints with real torchrun (issue 12).

The demo plan (2 CPU ranks, FSDP2) saves sharded checkpoints by default: each rank stages its
shard on the training path and writes it on a background thread; the marker comes only once
every rank's write is done. Test-only faults (``ORCHESTRATE_SAVE_FAULT``) slow or kill the
background write at its ``write`` point.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from orch_helpers import orch, progress, status, submit_small, wait_end, wait_for

from orchestrator.worker.checkpoints import read_marker, verify_checkpoint

pytestmark = pytest.mark.integration

_submit = submit_small


def _wait_state(home, job_id, timeout=420):
    return wait_end(home, job_id, timeout)


def _records(run_dir, event):
    return [r for r in progress(run_dir) if r["event"] == event]


def test_a_sharded_save_is_written_in_the_background_while_training_goes_on(tmp_path, demo_assets):
    # The background write of checkpoint-4 takes 8 s more on rank 0: training must not wait for it.
    home, job_id = _submit(tmp_path, demo_assets, env={"ORCHESTRATE_SAVE_FAULT": "sleep:0:4:write:8"},
                           max_steps=40, save_steps=4)
    job = _wait_state(home, job_id)
    assert job["state"] == "COMPLETED" and [a["failure"] for a in job["attempts"]] == ["COMPLETED"], job["message"]
    run = job["run_dir"]
    ckpt4 = next(r for r in _records(run, "checkpoint") if r["step"] == 4)
    assert ckpt4["async_write"] is True and ckpt4["write_s"] >= 8 and ckpt4["save_s"] < 4, ckpt4
    # steps after 4 were trained while checkpoint-4 was being written, before it was committed
    assert any(r["step"] > 5 and r["time"] < ckpt4["time"] for r in _records(run, "log")), "training waited"
    final = Path(job["output_dir"]) / "checkpoint-40"
    assert verify_checkpoint(final, 40).ok and sorted(p.name for p in (final / "pytorch_model_fsdp_0").iterdir()) \
        == [".metadata", "__0_0.distcp", "__1_0.distcp"]          # one shard per rank, nothing gathered on rank 0
    marker = read_marker(final)
    assert (marker["world_size"], marker["global_batch"], marker["samples"]) == (2, 16, 40 * 16)
    assert status(home, job_id)["last_save"]["async_write"] is True
    detail = orch(home, "status", job_id, "--once").stdout
    assert "blocked training" in detail and "in the background" in detail


def test_a_rank_killed_during_a_background_write_resumes_from_the_previous_complete_checkpoint(
        tmp_path, demo_assets):
    home, job_id = _submit(tmp_path, demo_assets, env={"ORCHESTRATE_SAVE_FAULT": "kill:1:4:write"})
    job = _wait_state(home, job_id)
    assert job["state"] == "COMPLETED", job["message"]
    failures = [a["failure"] for a in job["attempts"]]
    assert failures[0] in ("KILLED", "WORKER_LOST") and failures[-1] == "COMPLETED", failures
    assert job["attempts"][1]["resumed_from"].endswith("checkpoint-2")   # checkpoint-4 was never committed
    assert not [r for r in _records(job["run_dir"], "checkpoint") if r["step"] == 4 and r["attempt"] == 1]


def test_launch_checkpoint_every_saves_when_the_time_has_passed(tmp_path, demo_assets):
    home, job_id = _submit(tmp_path, demo_assets, launch={"checkpoint": {"every": "3s"}}, max_steps=60,
                           save_steps=100000, save_total_limit=2)
    job = _wait_state(home, job_id)
    assert job["state"] == "COMPLETED", job["message"]
    timed = [r for r in _records(job["run_dir"], "checkpoint") if r.get("reason") == "time"]
    assert len(timed) >= 2, _records(job["run_dir"], "checkpoint")
    gaps = [b["started"] - a["started"] for a, b in zip(timed, timed[1:])]   # from one save's start to the next
    assert all(g >= 3 for g in gaps), gaps


def test_orchestrate_checkpoint_saves_a_running_job_now_and_prints_the_path(tmp_path, demo_assets):
    home, job_id = _submit(tmp_path, demo_assets, max_steps=100000, save_steps=100000, logging_steps=1)
    run = status(home, job_id)["run_dir"]
    wait_for(lambda: _records(run, "log"), 300, "the first training step")
    r = orch(home, "checkpoint", job_id, "--timeout", "120", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    path = Path(r.stdout.strip())
    step = int(path.name.split("-")[1])
    assert verify_checkpoint(path, step).ok                          # complete when the command returns
    rec = next(x for x in _records(run, "checkpoint") if x["path"] == str(path))
    assert rec["reason"] == "requested" and not (Path(run) / "requests" / "checkpoint.json").exists()
    assert orch(home, "cancel", job_id, timeout=120).returncode == 0
    r = orch(home, "checkpoint", job_id, timeout=60)
    assert r.returncode == 1 and "only a running job can save on demand" in r.stderr


def _logits(folder):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(input_ids=torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])).logits


def _digests(folder):
    from orchestrator.worker import digests

    return digests.file_digests(digests.weight_files(Path(folder))[0], "sha256")


def test_a_completed_job_has_a_verified_final_model_and_export_writes_one_from_a_sharded_checkpoint(
        tmp_path, demo_assets):
    import torch

    home, job_id = _submit(tmp_path, demo_assets, max_steps=8, save_steps=4, save_total_limit=2)
    job = _wait_state(home, job_id)
    assert job["state"] == "COMPLETED", job["message"]
    final = Path(job["final_model"])
    assert final == Path(job["output_dir"]) and "final model verified" in (Path(job["run_dir"]) / "supervisor.log"
                                                                           ).read_text()
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in final.iterdir()}
    out = tmp_path / "exported"
    r = orch(home, "export", job_id, "--step", "8", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "pytorch_model_fsdp_0").exists() is False and (out / "model.safetensors").is_file()
    assert torch.allclose(_logits(out), _logits(final), atol=1e-5)      # checkpoint-8 (sharded) = the final weights
    assert {k: v["digest"] for k, v in _digests(out).items()} == {k: v["digest"] for k, v in _digests(final).items()}
    r = orch(home, "export", job_id, "--step", "4", "--out", str(out), timeout=300)
    assert r.returncode == 2 and "nothing was overwritten" in r.stderr
    r = orch(home, "export", job_id, "--step", "4", "--out", str(tmp_path / "step4"), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not torch.allclose(_logits(tmp_path / "step4"), _logits(final), atol=1e-5)

"""A user's own training script, supervised without edits (issue 13), with real torchrun on 2 CPU ranks.

``tests/assets/seed_train.py`` is in the seed's shape (TrlParser, ``model_name``, a custom chat
template rendered into a text field of its own, ``SFTTrainer``, ``train(resume_from_checkpoint=...)``)
and knows nothing of orchestrate. Submitted with ``--script``: progress reaches the dashboard, a
kill -9 of a rank resumes from the newest complete checkpoint with final weights equal to an
uninterrupted run's, SIGTERM ends in a checkpoint and a resume; a script without a Trainer is
supervised by exit code and still stops at once on SIGTERM; a missing package in set-up is a USER_ERROR,
never retried. ``tests/assets/sft_then_dpo.py`` (issue 18.2) scores the base model with an evaluation-only
Trainer, then trains SFT and DPO in sequence: each training Trainer is a stage with its own checkpoints,
and a kill during DPO resumes DPO, not SFT.
"""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import yaml
from orch_helpers import orch, progress, status, wait_end, wait_for

from orchestrator.backends.processes import rank_pids

pytestmark = pytest.mark.integration
SCRIPT = Path(__file__).parent / "assets" / "seed_train.py"
STAGES = Path(__file__).parent / "assets" / "sft_then_dpo.py"


def _config(tmp_path, assets, name, script=SCRIPT, **overrides) -> Path:
    shutil.copy(script, tmp_path / script.name)
    cfg = {"model_name": str(assets / "model"), "dataset_path": str(assets / "data"), "text_field": "rendered",
           "max_length": 128, "fsdp": True, "activation_checkpointing": False,
           "fsdp_config": {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"},
           "per_device_train_batch_size": 8, "learning_rate": 0.003, "max_steps": 12, "save_steps": 4,
           "logging_steps": 1, "report_to": "none", "seed": 42,
           "launch": {"name": name, "nproc_per_node": 2, "retry": {"backoff_s": 0.5}}}
    cfg.update(overrides)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _submit(tmp_path, cfg, script_name=SCRIPT.name, env=None) -> tuple[Path, str]:
    home = tmp_path / "home"
    r = orch(home, "submit", "--detach", "--script", script_name, str(cfg), cwd=tmp_path, env_extra=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return home, r.stdout.strip()


def _wait_end(home, job_id):
    return wait_end(home, job_id, 420)


def _weights(checkpoint: Path, base: Path) -> dict:
    from orchestrator.worker.export import load_checkpoint_weights

    return load_checkpoint_weights(checkpoint, base).state_dict()


def test_a_seed_shaped_script_is_supervised_and_a_killed_rank_resumes_to_the_same_weights(tmp_path, demo_assets):
    home, ref_id = _submit(tmp_path, _config(tmp_path, demo_assets, "reference"))
    ref = _wait_end(home, ref_id)
    assert ref["state"] == "COMPLETED" and ref["step"] == 12, ref["message"]
    logs = [r for r in progress(ref["run_dir"]) if r["event"] == "log"]
    assert [r["step"] for r in logs] == list(range(1, 13)) and ref["distributed_type"] == "FSDP"

    home, job_id = _submit(tmp_path, _config(tmp_path, demo_assets, "killed"), env={"ORCHESTRATE_FAULT": "exit:1:7"})
    job = _wait_end(home, job_id)
    assert job["state"] == "COMPLETED", job["message"]
    assert [a["failure"] for a in job["attempts"]] == ["KILLED", "COMPLETED"]
    assert job["attempts"][1]["resumed_from"].endswith("checkpoint-4")          # the newest complete one
    assert (Path(job["output_dir"]) / "checkpoint-12" / ".orchestrate-complete").is_file()
    ours = _weights(Path(job["output_dir"]) / "checkpoint-12", demo_assets / "model")
    theirs = _weights(Path(ref["output_dir"]) / "checkpoint-12", demo_assets / "model")
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not (ours[k] == theirs[k]).all()]
    assert different == [], f"weights differ from the uninterrupted run: {different[:3]}"


def test_sigterm_ends_a_script_in_a_checkpoint_and_the_job_resumes(tmp_path, demo_assets):
    home, job_id = _submit(tmp_path, _config(tmp_path, demo_assets, "stopped", max_steps=400, save_steps=1000))
    run = status(home, job_id)["run_dir"]
    wait_for(lambda: len([r for r in progress(run) if r["event"] == "log"]) >= 3, 300, "three training steps")
    for pid in rank_pids(job_id).values():
        os.kill(pid, signal.SIGTERM)
    stop = wait_for(lambda: next((r for r in progress(run) if r["event"] == "end" and r["attempt"] == 1), None),
                    120, "the first attempt to stop")
    assert stop["state"] == "stopped"
    wait_for(lambda: [r for r in progress(run) if r["event"] == "log" and r["attempt"] == 2], 300, "a step of attempt 2")
    job = status(home, job_id)
    assert job["attempts"][0]["failure"] == "PREEMPTED"
    assert job["attempts"][1]["resumed_from"].endswith(f"checkpoint-{stop['step']}")
    assert orch(home, "cancel", job_id, timeout=120).returncode == 0


PLAIN = """import os, pathlib, time
print("rank", os.environ.get("RANK"), "started")
if os.environ.get("ORCHESTRATE_ATTEMPT") == "1":   # the first attempt waits: only a signal ends it early
    pathlib.Path(os.environ["ORCHESTRATE_ATTEMPT_DIR"], "ready-" + os.environ["RANK"]).touch()
    time.sleep(900)
print("done")
"""


def test_a_script_without_a_trainer_stops_on_sigterm_and_a_missing_package_is_a_user_error(tmp_path, demo_assets):
    """No Trainer ever attaches: SIGTERM (cancel, preemption, a time limit) still ends the script at once, as
    "stopped, resumable"; the next attempt completes, supervised by exit code."""
    (tmp_path / "src").mkdir()
    plain = tmp_path / "src" / "plain.py"
    plain.write_text(PLAIN)
    home, job_id = _submit(tmp_path, _config(tmp_path, demo_assets, "plain", script=plain), script_name="plain.py")
    attempt_dir = Path(status(home, job_id)["run_dir"]) / "attempts" / "1"
    wait_for(lambda: len(list(attempt_dir.glob("ready-*"))) == 2, 300, "both ranks to run the script")
    for pid in rank_pids(job_id).values():
        os.kill(pid, signal.SIGTERM)
    job = _wait_end(home, job_id)
    assert job["state"] == "COMPLETED" and [a["failure"] for a in job["attempts"]] == ["PREEMPTED", "COMPLETED"]
    assert job["attempts"][0]["ended"] - job["attempts"][0]["started"] < 300   # not the script's 900 s sleep
    assert "the script created no Trainer" in (Path(job["run_dir"]) / "attempts/2/status.json").read_text()

    broken = tmp_path / "src" / "needs_wandb.py"
    broken.write_text("raise RuntimeError('WandbCallback requires wandb to be installed. Run `pip install wandb`.')\n")
    home, job_id = _submit(tmp_path, _config(tmp_path, demo_assets, "broken", script=broken),
                           script_name="needs_wandb.py")
    job = _wait_end(home, job_id)
    assert job["state"] == "FAILED" and [a["failure"] for a in job["attempts"]] == ["USER_ERROR"], job["attempts"]


def test_sft_then_dpo_each_stage_checkpoints_apart_and_a_kill_resumes_the_stage_that_ran(tmp_path, demo_assets):
    """An eval-only Trainer, SFT (4 steps), then DPO (6 steps) in one script, same output_dir; rank 1 dies at
    DPO's step 5: the retry trains no SFT step again and DPO goes on from its own newest checkpoint, the
    steps it trains again with the losses they had."""
    cfg = _config(tmp_path, demo_assets, "stages", script=STAGES, text_field=None, max_steps=4, save_steps=2,
                  dpo_max_steps=6, per_device_train_batch_size=4)
    home, job_id = _submit(tmp_path, cfg, script_name=STAGES.name, env={"ORCHESTRATE_FAULT": "exit:1:5"})
    job = _wait_end(home, job_id)
    assert job["state"] == "COMPLETED", job["message"]
    assert [a["failure"] for a in job["attempts"]] == ["KILLED", "COMPLETED"]
    out, recs = Path(job["output_dir"]), progress(job["run_dir"])
    stages = [r for r in recs if r["event"] == "stage"]   # the evaluation-only Trainer is not a stage
    assert [(r["attempt"], r["stage"], r["trainer"]) for r in stages] == [
        (1, 1, "SFTTrainer"), (1, 2, "DPOTrainer"), (2, 1, "SFTTrainer"), (2, 2, "DPOTrainer")]
    assert [r["folder"] for r in stages[:2]] == [str(out), str(out / "stage-2")]
    # DPO's checkpoint-4 counts once its background write is committed (a step later; under load maybe not yet)
    dpo_resume = int(stages[3]["resumed_from"].rsplit("-", 1)[1])
    assert [r["resumed_from"] for r in stages] == [None, None, str(out / "checkpoint-4"),
                                                  str(out / "stage-2" / f"checkpoint-{dpo_resume}")]
    logs = [r for r in recs if r["event"] == "log"]
    assert [(r["attempt"], r["step"]) for r in logs] == [(1, s) for s in (1, 2, 3, 4, 1, 2, 3, 4)] + [
        (2, s) for s in range(dpo_resume + 1, 7)]
    first = {r["step"]: r["loss"] for r in logs[4:8]}             # DPO's steps in attempt 1
    assert all(r["loss"] == first[r["step"]] for r in logs[8:] if r["step"] in first)
    for done in (out / "checkpoint-4", out / "stage-2" / "checkpoint-6"):
        assert (done / ".orchestrate-complete").is_file(), done
    assert not list((out / "base-eval").glob("checkpoint-*"))
    assert (out / "model.safetensors").is_file()        # the script's own final save, where it asked

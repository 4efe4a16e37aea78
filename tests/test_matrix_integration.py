"""The configs people run, not the demo (issue 16.8): real torchrun, 2 CPU ranks, FSDP2, one kill -9 each.

A pairwise matrix over precision {fp32, bf16} x schedule {max_steps, epochs + eval + best model} x
architecture {llama, qwen2, gemma (tied embeddings)} x data shape {messages, prompt/completion, text}:
every pair of values of any two factors is in at least one of the nine cells (checked below).
The first cell is the seed's own YAML (its key names, string ``fsdp``, ``bf16``, ``torch_dtype``).

Every cell loses rank 1 to SIGKILL after its first complete checkpoint: the test-only fault holds rank 1
at the start of the second step after that checkpoint (attempt 1 only, so the kill cannot come too late
on a fast machine), the test waits for the checkpoint's commit record and kills rank 1 with SIGKILL from
outside. The cell must then:

* end COMPLETED after exactly one KILLED attempt, the second resuming from a verified checkpoint;
* train every step once counted (the resumed attempt starts at the checkpoint, ends at max_steps);
* have its final model verified exactly in the saved dtype (``final_check.json``), and for the
  best-model cells, verified against the best checkpoint (``+best``);
* show evaluation (``last_eval``/``best_eval``) where it evaluated;
* say which data shape ``validate`` found.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from orch_helpers import REPO, orch, progress, status, wait_end, wait_for

from orchestrator.backends.processes import rank_pids
from orchestrator.worker import channel

pytestmark = pytest.mark.integration

# (architecture, data shape, precision, schedule)
CELLS = [
    ("llama", "messages", "bf16", "steps"),          # the seed's YAML
    ("llama", "prompt_completion", "bf16", "epochs"),
    ("llama", "text", "fp32", "steps"),
    ("qwen2", "messages", "bf16", "epochs"),
    ("qwen2", "conversational_prompt_completion", "fp32", "steps"),
    ("qwen2", "text", "fp32", "epochs"),
    ("gemma", "messages", "fp32", "steps"),           # gemma: bf16 weights (as on the Hub), tied embeddings
    ("gemma", "prompt_completion", "fp32", "epochs"),
    ("gemma", "text", "bf16", "epochs"),
]
SHAPE_WORDS = {"messages": "conversational (messages) rows in", "prompt_completion": "prompt/completion (plain text) rows in",
               "conversational_prompt_completion": "prompt/completion (conversational) rows in",
               "text": "language modelling text ('text') rows in"}
EPOCH_ROWS = 96          # 6 steps of 16 rows per epoch (2 ranks x 8): an epoch schedule in seconds
STEPS, SAVE_STEPS = 8, 2
LAUNCH = {"nproc_per_node": 2, "retry": {"backoff_s": 0.5, "max_restarts": 3},
          "watchdog": {"startup_timeout_s": 300}}


def _family(shape: str) -> str:
    return "prompt_completion" if "prompt_completion" in shape else shape


def test_the_cells_cover_every_pair_of_factor_values():
    values = [sorted({c[i] if i else c[i] for c in CELLS}) for i in range(4)]
    values[1] = sorted({_family(c[1]) for c in CELLS})
    cells = [(a, _family(d), p, s) for a, d, p, s in CELLS]
    for i, j in itertools.combinations(range(4), 2):
        missing = {(x, y) for x in values[i] for y in values[j]} - {(c[i], c[j]) for c in cells}
        assert not missing, f"factors {i} x {j}: no cell for {missing}"


def _seed_config(assets: Path) -> dict:
    """The seed's YAML as users wrote it, pointed at the cell's model and data, made small."""
    cfg = yaml.safe_load((REPO / "configs" / "seed-llama-3.1-8b-fsdp.yaml").read_text())
    cfg.update(model_name=str(assets / "model"), dataset_path=str(assets / "data"), max_seq_len=128,
               per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate="3e-3",
               logging_steps=1, gradient_checkpointing=False, warmup_ratio=0.0)
    cfg["fsdp"] = "full_shard auto_wrap"        # no offload on this CPU test
    cfg.pop("output_dir")
    return cfg


def _config(tmp: Path, assets: Path, arch: str, shape: str, precision: str, schedule: str) -> dict:
    if (arch, shape) == ("llama", "messages"):
        cfg = _seed_config(assets)
    else:
        cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
        cfg.update(model_id=str(assets / "model"), dataset_path=str(assets / "data"), logging_steps=1)
        cfg["bf16"] = precision == "bf16"
        if arch == "gemma" and precision == "fp32":
            cfg["dtype"] = "float32"   # bf16 weights trained in fp32; the bf16 cell loads them as they are ("auto")
    if schedule == "steps":
        cfg.update(max_steps=STEPS, save_strategy="steps", save_steps=SAVE_STEPS, num_train_epochs=1)
    else:
        # unpacked rows, so that an epoch is EPOCH_ROWS // 16 steps whatever the shape (packing is on by default)
        cfg.update(max_steps=-1, num_train_epochs=2, eval_strategy="epoch", save_strategy="epoch", packing=False,
                   load_best_model_at_end=True, metric_for_best_model="eval_loss", save_total_limit=1,
                   per_device_eval_batch_size=8)
    cfg["save_total_limit"] = 1
    cfg["launch"] = {"name": f"{arch}-{schedule}", **LAUNCH}
    return cfg


def _first_checkpoint(run_dir: str) -> int | None:
    """The step of attempt 1's first committed checkpoint (its record follows the marker)."""
    return next((r["step"] for r in progress(run_dir) if r["event"] == "checkpoint" and r["attempt"] == 1), None)


def _bf16_weights(assets: Path) -> None:
    """Re-save the model in bfloat16, as models ship on the Hub."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(assets / "model")


def _fewer_rows(assets: Path, n: int) -> None:
    train = assets / "data" / "train_dataset.json"
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:n]))


@pytest.mark.parametrize("arch,shape,precision,schedule", CELLS, ids=["-".join(c) for c in CELLS])
def test_a_cell_survives_a_killed_rank_and_completes_verified(tmp_path, arch, shape, precision, schedule):
    from orchestrator.demo import prepare_demo

    assets = prepare_demo(tmp_path / "assets", arch=arch, shape=shape)
    first_save = SAVE_STEPS if schedule == "steps" else EPOCH_ROWS // 16
    if schedule == "epochs":
        _fewer_rows(assets, EPOCH_ROWS)
    if arch == "gemma":
        _bf16_weights(assets)
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tmp_path, assets, arch, shape, precision, schedule), sort_keys=False))
    home = tmp_path / "home"

    checked = orch(home, "validate", str(cfg_path), cwd=tmp_path, timeout=180)
    assert checked.returncode == 0, checked.stderr
    assert SHAPE_WORDS[shape] in checked.stdout + checked.stderr

    held = {"ORCHESTRATE_FAULT": f"hang:1:{first_save + 2}"}      # attempt 1 only
    r = orch(home, "submit", "--detach", str(cfg_path), cwd=tmp_path, timeout=180, env_extra=held)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    run_dir = status(home, job_id)["run_dir"]
    assert wait_for(lambda: _first_checkpoint(run_dir), 300, "attempt 1's first checkpoint") == first_save
    os.kill(wait_for(lambda: rank_pids(job_id).get(1), 30, "rank 1"), signal.SIGKILL)
    job = wait_end(home, job_id)

    assert job["state"] == "COMPLETED", job["message"]
    assert [a["failure"] for a in job["attempts"]] == ["KILLED", "COMPLETED"], job["attempts"]
    second = job["attempts"][1]
    assert second["start_step"] == first_save and second["resumed_from"].endswith(f"checkpoint-{first_save}")
    assert job["step"] == job["max_steps"] and job["max_steps"] > second["start_step"]
    logs = [rec for rec in progress(run_dir) if rec["event"] == "log" and rec["attempt"] == 2]
    assert logs and logs[0]["step"] == second["start_step"] + 1 and all(
        rec["loss"] == rec["loss"] for rec in logs)                     # finite (NaN != NaN)

    adir = Path(run_dir) / "attempts" / "2"
    check = channel.read_json(adir / channel.FINAL_CHECK_FILE)
    assert check["verified"] is True and check["reason"] is None, check
    record = channel.read_json(adir / channel.FINAL_RECORD_FILE)
    # what was compared is what was saved: bf16 cells train with bf16 autocast on FSDP's float32 master weights
    tensors = record["tensors"]
    assert tensors and {t["dtype"] for t in tensors.values()} <= {"float32", "bfloat16"}
    if arch == "gemma":   # tied input/output embeddings: one tensor, or two equal ones
        assert tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])["digest"] == \
            tensors["model.embed_tokens.weight"]["digest"]
        if precision == "fp32":
            assert {t["dtype"] for t in tensors.values()} == {"float32"}   # bf16 weights, trained and saved in fp32
    assert check["method"].startswith("digest") and "logits" in check["method"] and check["peak_rss_mb"] < 2048, check
    if schedule == "steps":   # the last (sharded, 2-rank) checkpoint holds the final weights, read chunk by chunk
        from orchestrator.worker import digests

        last = Path(job["output_dir"]) / f"checkpoint-{STEPS}" / "pytorch_model_fsdp_0"
        saved = {k: v["digest"] for k, v in digests.dcp_digests(last, record["algorithm"]).items()}
        assert saved and saved == {k: v["digest"] for k, v in tensors.items() if k in saved}
        assert set(tensors) - set(saved) <= {"lm_head.weight"}     # a tied lm_head is one tensor in DCP
    if schedule == "epochs":
        assert "+best" in check["method"], check
        assert job["last_eval"] and job["best_eval"]["eval_loss"] <= job["last_eval"]["eval_loss"]
        state = json.loads((Path(job["output_dir"]) / f"checkpoint-{job['step']}" / "trainer_state.json").read_text())
        assert state["best_model_checkpoint"] and Path(state["best_model_checkpoint"]).is_dir()

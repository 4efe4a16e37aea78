"""Real jobs (2 CPU ranks, FSDP2, through the CLI) whose final model is checked exactly (issue 16.1).

Before, every bf16 job ended FAILED after training to the end: its final model was compared in fp32
with a 1e-4 tolerance. Now the check compares every saved tensor's digest with the trained one in the
saved dtype (and the logits like with like), so bf16 jobs end COMPLETED and verified.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orch_helpers import submit_small, wait_end
from orchestrator.worker import channel

pytestmark = pytest.mark.integration
CONTRACT = {"verified", "reason", "folder", "started", "ended", "method", "peak_rss_mb"}


def _final(job: dict) -> tuple[dict, dict]:
    adir = Path(job["run_dir"]) / "attempts" / str(job["attempts"][-1]["n"])
    return channel.read_json(adir / channel.FINAL_CHECK_FILE), channel.read_json(adir / channel.FINAL_RECORD_FILE)


def test_a_bf16_demo_job_completes_with_its_final_model_verified_exactly(tmp_path, demo_assets):
    home, job_id = submit_small(tmp_path, demo_assets, bf16=True, max_steps=4, save_steps=2)
    job = wait_end(home, job_id)
    assert job["state"] == "COMPLETED" and job["message"] == "completed", job["message"]
    check, record = _final(job)
    assert set(check) == CONTRACT and check["verified"] is True and check["reason"] is None, check
    assert check["folder"] == job["final_model"] == str(Path(job["output_dir"]))
    assert check["method"] == "digest+logits" and check["peak_rss_mb"] < 2048
    assert record["logits"]["dtype"] == "bfloat16"            # FSDP2's bf16 compute, compared in bf16 on CPU
    assert {e["dtype"] for e in record["tensors"].values()} == {"float32"}   # fp32 weights, bf16 autocast
    # The last (sharded, 2-rank) checkpoint holds the final weights: the check's DCP reader, chunk by chunk,
    # gives the digests the worker took of the gathered state.
    from orchestrator.worker import digests

    last = Path(job["output_dir"]) / "checkpoint-4" / "pytorch_model_fsdp_0"
    assert {k: v["digest"] for k, v in digests.dcp_digests(last, record["algorithm"]).items()} == {
        k: v["digest"] for k, v in record["tensors"].items()}


@pytest.fixture(scope="module")
def gemma_assets(demo_assets, tmp_path_factory) -> Path:
    """A tiny Gemma (tied input/output embeddings) whose weights ship in bfloat16, the demo's tokenizer and data."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("gemma")
    tok = AutoTokenizer.from_pretrained(demo_assets / "model")
    cfg = AutoConfig.for_model("gemma", vocab_size=len(tok), hidden_size=64, intermediate_size=128, head_dim=16,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    (out / "data").symlink_to(demo_assets / "data")
    return out


def test_tied_embeddings_with_bf16_hub_weights_trained_in_fp32_are_verified_in_the_saved_dtype(
        tmp_path, gemma_assets):
    home, job_id = submit_small(tmp_path, gemma_assets, bf16=True, dtype="float32", max_steps=4, save_steps=2)
    job = wait_end(home, job_id)
    assert job["state"] == "COMPLETED" and job["message"] == "completed", job["message"]
    check, record = _final(job)
    assert check["verified"] is True and check["method"] == "digest+logits", check
    assert record["tensors"]["lm_head.weight"]["dtype"] == "float32"             # trained (and saved) in fp32
    assert record["tensors"]["lm_head.weight"]["digest"] == record["tensors"]["model.embed_tokens.weight"]["digest"]
    index = json.loads((Path(job["output_dir"]) / "config.json").read_text())
    assert index["tie_word_embeddings"] is True and index["dtype"] == "float32"
    from orchestrator.worker import digests

    # FSDP2 gathers the tied pair as two tensors, so save_pretrained may store lm_head too: equal, in fp32.
    saved = digests.file_digests([Path(job["output_dir"]) / "model.safetensors"], record["algorithm"])
    assert saved["model.embed_tokens.weight"]["dtype"] == "float32"
    assert saved.get("lm_head.weight", saved["model.embed_tokens.weight"])["digest"] == \
        saved["model.embed_tokens.weight"]["digest"]

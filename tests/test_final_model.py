"""The final-model check on real safetensors folders (orchestrator/worker/folder_check.py, digests.py,
final_record.py, supervise/final_model.py): tiny random models built here, no network.

Each folder is what ``save_pretrained`` writes; each record is what the worker records from the state it
saved. The check must say verified for the model that was saved, whatever the dtype, the sharding or the
tied weights, and name every real difference exactly.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from orchestrator.supervise import final_model as sfm  # noqa: E402
from orchestrator.worker import channel, digests  # noqa: E402
from orchestrator.worker.final_record import (build_record, capture_saved_state, final_record, fingerprint,  # noqa: E402
                                               trained_logits)  # noqa: E402
from orchestrator.worker.folder_check import MISMATCH, UNVERIFIED, VERIFIED, check_folder, load_names  # noqa: E402

VOCAB = 96
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB, max_position_embeddings=64)
EXTRA = {"gemma": {"head_dim": 8}, "qwen3": {"head_dim": 8}, "mixtral": {"num_local_experts": 2}}


def tokenizer(eos: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1" if eos else None)


def make_model(arch: str = "llama", dtype=torch.float32, seed: int = 0, **cfg):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, **{**SHAPE, **EXTRA.get(arch, {}), "pad_token_id": None, "eos_token_id": 1,
                                           "bos_token_id": None, **cfg})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def saved(tmp_path: Path, model, name: str = "final", **save_kw) -> tuple[Path, dict]:
    """``model`` saved as a Hugging Face folder with a tokenizer, and the worker's record of it."""
    folder = tmp_path / name
    model.save_pretrained(folder, **save_kw)
    tokenizer().save_pretrained(folder)
    return folder, build_record(model, model.state_dict(), folder, fingerprint(model))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("qwen3", torch.bfloat16),
                                        ("mistral", torch.float16)])
def test_a_saved_model_is_verified_exactly_in_its_dtype_and_one_changed_bit_is_named(tmp_path, arch, dtype):
    folder, record = saved(tmp_path, make_model(arch, dtype))
    result = check_folder(folder, record)
    assert result["verdict"] == VERIFIED, result
    assert result["method"] == "digest+logits" and result["logits"]["max_abs_diff"] == 0.0
    assert {e["dtype"] for e in record["tensors"].values()} == {str(dtype).split(".")[1]}
    _flip_last_byte(folder / "model.safetensors")     # the last byte of the last tensor's data
    result = check_folder(folder, record)
    assert result["verdict"] == MISMATCH and "1 tensor(s) differ" in result["reason"], result


def test_tied_embeddings_gemma_lm_head_comes_from_the_input_embeddings(tmp_path):
    model = make_model("gemma", torch.bfloat16)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    folder, record = saved(tmp_path, model)
    assert "lm_head.weight" in record["tensors"] and "lm_head.weight" not in digests.read_header(
        folder / "model.safetensors")[1]
    assert check_folder(folder, record)["verdict"] == VERIFIED
    # A trained lm_head that drifted from the embeddings (ties broken in training) is lost on reload: named.
    record["tensors"]["lm_head.weight"]["digest"] = "0" * 32
    result = check_folder(folder, record)
    assert result["verdict"] == MISMATCH
    assert "lm_head.weight (tied to model.embed_tokens.weight): its bytes differ" in result["reason"]
    # Stored anyway (FSDP2 gathers the pair as two tensors), but drifted: from_pretrained ties it, so it is lost.
    state = dict(model.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"].clone() + 1
    folder = tmp_path / "untied"
    model.save_pretrained(folder, state_dict=dict(state))            # it pops what it writes
    tokenizer().save_pretrained(folder)
    assert "lm_head.weight" in digests.read_header(folder / "model.safetensors")[1]
    result = check_folder(folder, build_record(model, state, folder))
    assert result["verdict"] == MISMATCH and "lm_head.weight (tied to model.embed_tokens.weight)" in result["reason"]


def test_a_sharded_folder_is_read_through_its_index_and_a_lost_shard_is_named(tmp_path):
    folder, record = saved(tmp_path, make_model("llama"), max_shard_size="40KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and (folder / digests.INDEX_FILE).is_file()
    assert check_folder(folder, record)["verdict"] == VERIFIED
    shards[0].write_bytes(shards[0].read_bytes()[:-10])                      # cut short: a broken folder
    result = check_folder(folder, record)
    assert result["verdict"] == MISMATCH and "not a readable safetensors file" in result["reason"]
    shards[1].unlink()
    result = check_folder(folder, record)
    assert result["verdict"] == MISMATCH and shards[1].name in result["reason"] and "missing" in result["reason"]


def test_bf16_hub_weights_trained_in_fp32_and_a_save_that_casts_are_compared_in_the_saved_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    hub, _ = saved(tmp_path, make_model("llama", torch.bfloat16), "hub")              # weights ship in bf16
    trained = AutoModelForCausalLM.from_pretrained(hub, dtype=torch.float32)         # dtype: float32 training
    with torch.no_grad():
        trained.model.norm.weight.add_(1e-3)                                         # "trained"
    folder, record = saved(tmp_path, trained)
    assert record["tensors"]["model.norm.weight"]["dtype"] == "float32"             # the saved dtype counts
    assert check_folder(folder, record)["verdict"] == VERIFIED
    # A save that casts to bf16: the record follows the written headers, the fp32 tensors are cast as the save did.
    state = trained.state_dict()
    folder = tmp_path / "cast"
    trained.to(torch.bfloat16).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    record = build_record(trained, state, folder)
    entry = record["tensors"]["model.norm.weight"]
    assert (entry["dtype"], entry["trained_dtype"]) == ("bfloat16", "float32")
    assert check_folder(folder, record)["verdict"] == VERIFIED


def test_a_tokenizer_with_more_tokens_than_embeddings_is_named_as_the_cause(tmp_path):
    # transformers 5 gives a Qwen2 tokenizer without a pad token one ('<|endoftext|>'): 97 tokens, 96 rows.
    folder, record = saved(tmp_path, make_model("qwen2"))
    result = check_folder(folder, record)
    assert result["verdict"] == MISMATCH, result
    assert "the tokenizer in" in result["reason"] and "97 tokens" in result["reason"]
    assert "96 input embeddings" in result["reason"] and "pad_token" in result["reason"]


def test_a_pad_token_id_outside_the_embeddings_is_named(tmp_path):
    folder, record = saved(tmp_path, make_model("llama"))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "pad_token_id": VOCAB}))
    result = check_folder(folder, record)
    assert result["verdict"] == MISMATCH and f"pad_token_id {VOCAB}" in result["reason"]
    assert "Padding_idx" in result["reason"]


def test_what_cannot_be_checked_is_unverified_never_a_mismatch(tmp_path):
    model = make_model("llama")
    folder, record = saved(tmp_path, model)
    with pytest.raises(digests.NotComparable, match="holds no tensor"):    # a capture that saw nothing
        build_record(model, {}, folder)
    assert check_folder(folder, None)["verdict"] == UNVERIFIED
    err = check_folder(folder, {"format": 1, "error": "no digests of the saved weights: boom"})
    assert err["verdict"] == UNVERIFIED and "boom" in err["reason"]
    # Same weights, another computation (a config edited after the save): logits differ, nothing is failed.
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "default",
                                                                               "rope_theta": 3.0}}))
    result = check_folder(folder, record)
    assert result["verdict"] == UNVERIFIED and "every weight is identical" in result["reason"], result
    # Over the logits budget: the digests alone decide.
    result = check_folder(folder, record, logits_budget=1024)
    assert result["verdict"] == VERIFIED and not result["logits"]["compared"] and "budget" in result["logits"]["why"]


def test_renamed_keys_follow_from_pretrained_and_converted_ones_are_not_verified(tmp_path):
    # Mixtral: transformers 5 saves the router under its legacy name and splits the experts (reverted on load).
    model = make_model("mixtral")
    folder, record = saved(tmp_path, model)
    files = digests.file_digests(digests.weight_files(folder)[0], "sha256")
    names, converted = load_names(model, files)
    assert names["model.layers.0.block_sparse_moe.gate.weight"] == "model.layers.0.mlp.gate.weight"
    assert converted and all(".experts." in k for k in converted)
    result = check_folder(folder, record)
    assert result["verdict"] == UNVERIFIED and "converted when loaded" in result["reason"]


def test_missing_and_unexpected_tensors_are_mismatches(tmp_path):
    from safetensors.torch import load_file, save_file

    folder, record = saved(tmp_path, make_model("llama"))
    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, folder / "model.safetensors",
              metadata={"format": "pt"})
    result = check_folder(folder, record)
    assert result["verdict"] == MISMATCH and "lacks 1 of the model's weights (model.norm.weight)" in result["reason"]
    save_file({**state, "model.extra.weight": torch.zeros(2)}, folder / "model.safetensors", metadata={"format": "pt"})
    result = check_folder(folder, record)
    assert result["verdict"] == MISMATCH and "model.extra.weight" in result["reason"]


def test_the_best_checkpoint_is_compared_sharded_or_full(tmp_path):
    import torch.distributed.checkpoint as dcp

    model = make_model("llama")
    folder, record = saved(tmp_path, model)
    best = tmp_path / "checkpoint-4"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(best / "pytorch_model_fsdp_0"))
    record["best"] = {"checkpoint": str(best), "metric": "eval_loss", "value": 1.0}
    result = check_folder(folder, record)
    assert result["verdict"] == VERIFIED and result["method"] == "digest+best+logits", result
    other = tmp_path / "checkpoint-2"
    make_model("llama", seed=1).save_pretrained(other)                     # a full (safetensors) checkpoint
    record["best"]["checkpoint"] = str(other)
    result = check_folder(folder, record)
    assert result["verdict"] == MISMATCH and "not the best checkpoint's" in result["reason"]
    record["best"]["checkpoint"] = None
    result = check_folder(folder, record)
    assert result["verdict"] == UNVERIFIED and "best_model_checkpoint is null" in result["reason"]


def test_file_digests_stream_in_chunks_equal_to_in_memory_ones(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setattr(digests, "CHUNK", 1000)       # many chunks per tensor, odd sizes
    tensors = {"a": torch.randn(37, 29), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(7),
               "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    save_file(tensors, tmp_path / "x.safetensors")
    for algo in ("xxh3_128", "sha256"):
        on_disk = digests.file_digests([tmp_path / "x.safetensors"], algo, threads=3)
        in_memory = digests.state_digests(tensors, algo)
        assert {k: (v["dtype"], v["shape"], v["digest"]) for k, v in on_disk.items()} == {
            k: (v["dtype"], v["shape"], v["digest"]) for k, v in in_memory.items()}
    (tmp_path / "x.safetensors").write_bytes((tmp_path / "x.safetensors").read_bytes()[:-4])
    with pytest.raises(digests.Unreadable, match="not a readable safetensors file"):   # safe_open refuses it
        digests.file_digests([tmp_path / "x.safetensors"], "sha256")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_trainer_s_final_save_is_recorded_and_verified(tmp_path, precision):
    """The worker's path on a real Trainer (one process): 2 steps in this precision, save_model(), the record."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = make_model("gemma" if precision == "bf16" else "llama")     # tied embeddings in one of them
    rows = [{"input_ids": torch.tensor([2, 3, 4, 5, 6, 7]), "labels": torch.tensor([2, 3, 4, 5, 6, 7])}] * 4
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=2,
                             per_device_train_batch_size=2, learning_rate=1e-2, save_strategy="no",
                             **({precision: True} if precision != "fp32" else {}))
    trainer = Trainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer(),
                      data_collator=default_data_collator)
    before = model.model.norm.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, model.model.norm.weight)             # it trained
    with capture_saved_state(trainer) as box:
        trainer.save_model()
    assert box["called"] and "_save" not in vars(trainer)                # the Trainer is left as it was
    record = final_record(trainer, box, str(tmp_path / "out"), trained_logits(trainer))
    assert "error" not in record, record
    assert record["logits"]["dtype"] == "float32"        # without accelerate's autocast: the fp32 weights compute
    result = check_folder(tmp_path / "out", record)
    assert result["verdict"] == VERIFIED, result


def test_final_check_verdicts_become_the_job_s_messages(tmp_path):
    adir = tmp_path / "a"
    assert sfm.verify_final_model(sys.executable, adir) is None         # a script that saves no final model
    channel.write_json_atomic(adir / channel.FINAL_RECORD_FILE, {"format": 1, "error": "x"})
    check = sfm.verify_final_model(sys.executable, adir)                # a record but no weights: fails
    assert check.failed and "saved no final model" in check.failure
    written = channel.read_json(adir / channel.FINAL_CHECK_FILE)          # contract 3, exactly these keys
    assert set(written) == {"verified", "reason", "folder", "started", "ended", "method", "peak_rss_mb"}
    assert written["verified"] is False and "saved no final model" in written["reason"]
    assert written["folder"] is None and written["started"] <= written["ended"]
    unverified = sfm._verdict({"verdict": "unverified", "reason": "why"}, "/m", 3, "")
    assert unverified.completed == "COMPLETED, final model not verified: why (folder: /m)" and not unverified.failed
    crashed = sfm._verdict({}, "/m", 137, "Killed\n")
    assert not crashed.failed and "the check did not finish (exit status 137: Killed)" in crashed.completed
    mismatch = sfm._verdict({"verdict": "mismatch", "reason": "bytes differ"}, "/m", 1, "")
    assert mismatch.failure == "the final model in /m is not the trained model: bytes differ"
    assert mismatch.completed is None


def test_checkpoint_weights_load_in_their_saved_dtype(tmp_path):
    import torch.distributed.checkpoint as dcp

    from orchestrator.worker.export import load_checkpoint_weights

    model = make_model("llama", torch.bfloat16)
    base, _ = saved(tmp_path, model, "base")
    ckpt = tmp_path / "checkpoint-3"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt / "pytorch_model_fsdp_0"))
    loaded = load_checkpoint_weights(ckpt, base)
    assert loaded.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    shutil.rmtree(ckpt)

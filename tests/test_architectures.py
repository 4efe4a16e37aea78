"""Architectures beyond Llama (issue 16.5): the demo's tiny random models of each, FSDP's wrap classes,
packed per-document attention, and what validate catches about a model folder before anything starts.

Unit tests build tiny models in memory (a few hundred thousand parameters). The integration test trains the
architectures the CI matrix does not (Mistral with a sliding window, Phi-3) for a few steps on 2 CPU ranks
under FSDP2 through the real worker, on data shapes and ``dataset_path`` forms the matrix does not cover.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from orch_helpers import run_attempt_directly

from orchestrator.demo import ARCHS, MODEL_DIR, model_config, prepare_demo
from orchestrator.worker import architecture, model_check
from orchestrator.worker.varlen_attn import NAME, register

REPO = Path(__file__).resolve().parents[1]
LENGTHS = (7, 13, 5, 20)   # two documents longer than the 8-token windows below


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread (two threads on a busy 2-core machine spin ~50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(demo_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_assets / MODEL_DIR)


def tiny(arch: str, tokenizer, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = model_config(arch, tokenizer)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return AutoModelForCausalLM.from_config(cfg).float()


# --- FSDP wrap classes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_wrap_classes_are_found_and_accelerate_wraps_each_decoder_layer(arch, tokenizer):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    model = tiny(arch, tokenizer)
    cls_name, layers = architecture.wrap_classes(model.config.to_dict())
    assert cls_name == type(model).__name__ and layers == [type(model.model.layers[0]).__name__]
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [m for m in model.modules() if policy(m)]
    assert wrapped == list(model.model.layers)       # each decoder layer its own FSDP unit, nothing else


def test_a_wrong_wrap_class_is_named_before_start():
    training = {"fsdp": True, "fsdp_config": {"transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}}
    assert architecture.check_wrap({"model_type": "qwen2"}, training) == ([], [
        "fsdp_config.transformer_layer_cls_to_wrap: LlamaDecoderLayer is not a layer class of Qwen2ForCausalLM "
        "(its decoder layer: Qwen2DecoderLayer); remove the key (the model's own layer class is found) or name "
        "the right one"])
    training["fsdp_config"]["transformer_layer_cls_to_wrap"] = ["Qwen2DecoderLayer"]
    assert architecture.check_wrap({"model_type": "qwen2"}, training) == ([], [])


# --- packed per-document attention --------------------------------------------------------------------

def batches(vocab: int):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    g = torch.Generator().manual_seed(1)
    docs = [{"input_ids": torch.randint(3, vocab, (n,), generator=g).tolist()} for n in LENGTHS]
    return (DataCollatorForLanguageModeling(pad_token_id=0)(docs),
            DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(docs))


def loss_and_grads(model, impl: str, batch: dict):
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum") / (labels != -100).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# Windows shorter than two of the documents, and (Gemma 2) a soft-cap that binds once the attention
# logits are made large: the reference is transformers' own eager attention on the padded batch.
BINDING = {"mistral": {"sliding_window": 8}, "phi3": {"sliding_window": 8},
           "gemma2": {"sliding_window": 8, "attn_logit_softcapping": 2.0}}


def sharpen(model) -> None:
    """Larger query/key weights: attention logits of order 10, so soft-capping changes them."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
            layer.self_attn.k_proj.weight.mul_(40)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_attention_equals_eager_on_the_padded_batch(arch, tokenizer):
    register()
    overrides = BINDING.get(arch, {})
    model = tiny(arch, tokenizer, **overrides)
    if arch == "gemma2":
        sharpen(model)
    padded, packed = batches(len(tokenizer))
    ref, ref_grads = loss_and_grads(model, "eager", padded)
    for batch in (packed, padded):            # packed rows, and the padded fallback
        loss, grads = loss_and_grads(model, NAME, batch)
        assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6), (arch, loss.item(), ref.item())
        for name, g in grads.items():
            assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6), (arch, name)
    if overrides:   # the window and the soft-cap really bind: without them the loss is another
        loose = tiny(arch, tokenizer, **{k: 4096 if k == "sliding_window" else None for k in overrides})
        if arch == "gemma2":
            sharpen(loose)
        other, _ = loss_and_grads(loose, NAME, packed)
        assert abs(other.item() - ref.item()) > 1e-4, arch


def test_the_plan_says_why_packed_rows_cannot_take_the_fused_kernel():
    gemma2 = {"model_type": "gemma2", "sliding_window": 4096, "attn_logit_softcapping": 50.0,
              "layer_types": ["sliding_attention", "full_attention"]}
    notice = architecture.attention_notice({"attn_implementation": NAME, "max_length": 8192}, gemma2, NAME)
    assert notice.startswith(f"attention: {NAME} on gemma2: attention logit soft-capping (50) has no fused varlen")
    mistral = {"model_type": "mistral", "sliding_window": 4096}
    assert "sliding window of 4096" in architecture.attention_notice({"attn_implementation": NAME,
                                                                      "max_length": 8192}, mistral, NAME)
    # a window no document can exceed, a Qwen2 with windows off, another attention: nothing to say
    assert architecture.attention_notice({"attn_implementation": NAME, "max_length": 2048}, mistral, NAME) is None
    qwen = {"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}
    assert architecture.attention_notice({"attn_implementation": NAME, "max_length": 8192}, qwen, NAME) is None
    assert architecture.attention_notice({"attn_implementation": "eager"}, gemma2, NAME) is None


# --- what validate catches in a model folder -------------------------------------------------------------

def model_folder(root: Path, demo: Path, config: dict, tokenizer_edit=None) -> Path:
    """The demo's tokenizer files and a config.json (enough for validation; no weights)."""
    folder = root / "model"
    folder.mkdir(parents=True)
    for f in (demo / MODEL_DIR).iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, folder / f.name)
    if tokenizer_edit:
        tokenizer_edit(folder)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_transformers_added_pad_token_is_caught_with_the_fix(demo_assets, tokenizer, tmp_path):
    qwen = {"model_type": "qwen2", "vocab_size": len(tokenizer)}
    _, problems = model_check.check_folder(model_folder(tmp_path, demo_assets, qwen))
    assert len(problems) == 1 and problems[0].startswith(
        f"model_id: the tokenizer has {len(tokenizer) + 1} tokens but the model {len(tokenizer)} embedding rows "
        "(config.json vocab_size): transformers added the pad token '<|endoftext|>'")
    assert 'Fix: set "pad_token" in tokenizer_config.json to a token the model has' in problems[0]
    # the fix it names works: the same folder with pad_token set (as the demo saves every non-Llama model)
    notices, problems = model_check.check_folder(prepare_demo(tmp_path / "demo", arch="qwen2") / MODEL_DIR)
    assert (notices, problems) == ([], [])


def test_more_tokens_than_embeddings_a_missing_pad_and_a_bad_pad_id(demo_assets, tokenizer, tmp_path):
    def no_eos(folder: Path):
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg.pop("eos_token", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))

    small = {"model_type": "llama", "vocab_size": len(tokenizer) - 10, "pad_token_id": 600}
    _, problems = model_check.check_folder(model_folder(tmp_path, demo_assets, small, no_eos))
    assert [p.split(":")[1].strip() for p in problems] == [
        f"the tokenizer has {len(tokenizer)} tokens but the model only {len(tokenizer) - 10} embedding rows (config.json "
        "vocab_size)",
        "the tokenizer has no pad token, and no eos token to pad with",
        f"config.json pad_token_id 600 is outside the {len(tokenizer) - 10} embedding rows (loading fails with 'Padding_idx "
        "must be within num_embeddings')"]
    assert "resize_token_embeddings" in problems[0] and 'set "pad_token"' in problems[1]


def test_conversational_rows_need_a_chat_template(demo_assets, tokenizer, tmp_path):
    def no_template(folder: Path):
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))

    folder = model_folder(tmp_path, demo_assets, {"model_type": "llama", "vocab_size": len(tokenizer)}, no_template)
    assert model_check.check_folder(folder, conversational=False)[1] == []
    (problem,) = model_check.check_folder(folder, conversational=True)[1]
    assert problem.startswith("model_id: the rows are conversations but the tokenizer has no chat template")


def test_assistant_only_loss_needs_conversations_and_a_generation_block(demo_assets, tmp_path):
    from orchestrator.plan.inputs import inspect_inputs

    training = {"model_id": str(demo_assets / MODEL_DIR), "dataset_path": str(demo_assets / "data"),
                "assistant_only_loss": True}
    _, (problem,) = inspect_inputs(training)
    assert problem.startswith("assistant_only_loss: the tokenizer's chat template has no {% generation %} block")
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "plain text"}) + "\n")
    _, problems = inspect_inputs({**training, "dataset_path": str(tmp_path / "train.jsonl")})
    assert problems == ["assistant_only_loss: true needs conversational rows (messages), but the rows are language "
                        "modelling text ('text'); set it false, or use messages rows"]


def test_a_hub_id_that_cannot_be_resolved_is_named(tmp_path, monkeypatch):
    from helpers import fake_hub_cache

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, _, (problem,) = model_check.locate("some-org/some-model")
    assert folder is None and problem.startswith(
        "model_id: some-org/some-model is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE "
        "is set: download it first where the job runs (hf download some-org/some-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")      # nothing listens there: no network
    _, _, (problem,) = model_check.locate("some-org/some-model")
    assert "and the Hub cannot be reached (" in problem and "hf download some-org/some-model" in problem
    monkeypatch.setenv("HF_HUB_CACHE", str(fake_hub_cache(tmp_path / "cache", {"some-org/some-model": {}})))
    folder, notices, problems = model_check.locate("some-org/some-model")
    assert folder.name == "0" * 40 and (notices, problems) == ([], [])


def test_the_worker_names_an_unreachable_hub_id_as_the_users_error(tmp_path, monkeypatch):
    from orchestrator.states import Failure
    from orchestrator.supervise.classify import _classify_error
    from orchestrator.worker.support import error_errno

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError) as info:
        model_check.load_tokenizer("some-org/some-model")
    exc = info.value
    assert "model_id: some-org/some-model cannot be loaded here" in str(exc) and "hf download" in str(exc)
    record = {"type": type(exc).__name__, "message": str(exc), "phase": "setup", "errno": error_errno(exc)}
    assert record["errno"] == errno.ENOENT and _classify_error(record, False) is Failure.USER_ERROR


# --- validate, end to end --------------------------------------------------------------------------------

def test_validate_exits_2_with_every_problem_naming_its_key(demo_assets, tokenizer, tmp_path):
    model = model_folder(tmp_path, demo_assets, {"model_type": "qwen2", "vocab_size": len(tokenizer)})
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"prompt": "a prompt without its completion"}) + "\n")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({"model_id": str(model), "dataset_path": str(data), "max_steps": 2,
                                   "fp16": True, "bf16": True, "report_to": "none"}))
    env = {**os.environ, "ORCHESTRATE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(cfg)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    problems = [line[4:] for line in r.stderr.splitlines() if line.startswith("  - ")]
    assert [p.split(":")[0] for p in problems] == ["fp16, bf16", "dataset_path", "model_id"], r.stderr
    assert "At most one of fp16 and bf16" in problems[0]
    assert "a prompt without a completion is for preference/RL trainers" in problems[1]
    assert "transformers added the pad token" in problems[2]
    assert not (tmp_path / "home").exists()


def test_bf16_plans_and_builds_on_a_cpu_plan(demo_assets, tmp_path):
    from orchestrator.plan.prepare import prepare
    from orchestrator.plan.topology import Topology

    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg.update(model_id=str(demo_assets / MODEL_DIR), dataset_path=str(demo_assets / "data"), bf16=True,
               dtype="bfloat16", eval_strategy="epoch", num_train_epochs=1, max_steps=-1)
    path = tmp_path / "bf16.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _, plan = prepare(str(path), home=tmp_path / "home", topology=Topology(gpus=0, cpus=2, hostname="t"),
                      cwd=str(tmp_path), job_id="bf16")
    assert plan.device == "cpu" and plan.worker_config["bf16"] is True and plan.worker_config["use_cpu"] is True
    assert any(n.startswith("data: conversational (messages) rows in") and "eval split" in n for n in plan.notices)


# --- integration: the architectures the CI matrix does not train ------------------------------------------

RUNS = {
    # Mistral with a 16-token window shorter than most rows (the banded per-document path), conversational
    # prompt/completion rows from a single .parquet file.
    "mistral": dict(shape="conversational_prompt_completion", form="parquet", extra={}),
    # Phi-3 (fused qkv/gate_up), bf16, text rows in a save_to_disk DatasetDict with its eval split, evaluated.
    "phi3": dict(shape="text", form="disk", extra={"bf16": True, "eval_strategy": "steps", "eval_steps": 3,
                                                     "per_device_eval_batch_size": 8, "save_strategy": "steps",
                                                     "save_steps": 6}),
}


def _data_in_form(demo: Path, form: str, out: Path) -> Path:
    import datasets

    train = datasets.load_dataset("json", data_files=str(demo / "data" / "train_dataset.json"), split="train")
    test = datasets.load_dataset("json", data_files=str(demo / "data" / "test_dataset.json"), split="train")
    if form == "parquet":
        out.mkdir(parents=True)
        train.to_parquet(str(out / "train.parquet"))
        return out / "train.parquet"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(out))
    return out


@pytest.mark.integration
@pytest.mark.parametrize("arch", RUNS)
def test_architecture_trains_on_two_ranks_under_fsdp2(arch, tmp_path):
    from orchestrator.plan.prepare import prepare
    from orchestrator.plan.topology import Topology
    from orchestrator.worker import channel

    run = RUNS[arch]
    demo = prepare_demo(tmp_path / "demo", arch=arch, shape=run["shape"])
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg.update(model_id=str(demo / MODEL_DIR), dataset_path=str(_data_in_form(demo, run["form"], tmp_path / "data")),
               max_steps=6, logging_steps=1, save_strategy="no", launch={"name": arch, "nproc_per_node": 2})
    cfg.update(run["extra"])
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _, plan = prepare(str(path), home=tmp_path / "home", topology=Topology(gpus=0, cpus=2, hostname="t"),
                      cwd=str(tmp_path), job_id=f"{arch}-0101-000000")
    assert plan.worker_config["attn_implementation"] == NAME and plan.worker_config["packing"] is True
    rc, text = run_attempt_directly(plan, plan.worker_config, tmp_path)
    assert rc == 0, text[-3000:]
    recs = channel.read_progress(plan.paths.progress)
    start = next(r for r in recs if r["event"] == "start")
    assert start["world_size"] == 2 and start["distributed_type"] == "FSDP" and start["fsdp_wrapped"]
    losses = [r["loss"] for r in recs if r["event"] == "log" and "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    described = next(n for n in plan.notices if n.startswith("data: "))
    assert f"[orchestrate] {described}" in text          # validate and the worker read the same data the same way
    if "eval_strategy" in run["extra"]:
        state = json.loads((Path(plan.output_dir) / "checkpoint-6" / "trainer_state.json").read_text())
        assert [h["step"] for h in state["log_history"] if "eval_loss" in h] == [3, 6]

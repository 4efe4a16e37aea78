"""The per-GPU memory estimator (orchestrator/plan/memory.py) against measured points, and its chooser.

Measured on CPU (no GPU here), each a real tensor-storage count, not a formula:

* parameters: ``ModelShape.params`` == the parameter count of the built ``LlamaForCausalLM``;
* gradients and AdamW state: bytes of the ``.grad`` and optimizer-state storages after one step;
* FSDP2 sharding (integration, 2 gloo ranks): the local shard bytes per rank;
* activations: bytes of the distinct storages autograd saves for backward (``saved_tensors_hooks``),
  per token per decoder layer (the difference between 2L and L layers), bf16 and fp32, MHA and GQA.

The H200 points of ``shared/notes/seed-baseline.md`` (1.1 B Llama, seq 2048, micro-batch 8, one GPU,
FSDP, bf16) are a documented sanity band, not a fit: see ``test_h200_sanity_band``.
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace

import pytest
import torch

from orchestrator.plan.inputs import KNOWN_MODELS, read_model_shape
from orchestrator.plan.memory import GiB, ModelShape, Workload, choose, estimate

SHAPES = {  # (hidden, intermediate, heads, kv heads)
    "mha-64": (64, 128, 4, 4),
    "gqa-128": (128, 352, 8, 2),
    "gqa-256": (256, 704, 8, 4),
}
VOCAB = 512


def llama(h, i, layers, heads, kv, vocab=VOCAB, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=512,
                      tie_word_embeddings=tie, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg), ModelShape.from_config(cfg.to_dict())


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_is_exact(name, tie):
    h, i, heads, kv = SHAPES[name]
    model, shape = llama(h, i, 3, heads, kv, tie=tie)
    assert shape.params == sum(p.numel() for p in model.parameters())


def test_known_1b_shape_is_the_seed_model():
    shape = ModelShape.from_config(KNOWN_MODELS["TinyLlama/TinyLlama-1.1B-Chat-v1.0"])
    assert shape.params == 1_100_048_384       # "1.10 B parameters" in seed-baseline.md


def test_grads_and_adamw_state_bytes_match_storage():
    """fp32 weights: grads 4 B/param, AdamW moments 8 B/param (fused and foreach alike)."""
    model, shape = llama(64, 128, 2, 4, 2)
    for fused in (False, True):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused, foreach=None if fused else True)
        model(input_ids=torch.randint(0, VOCAB, (2, 16)), labels=torch.randint(0, VOCAB, (2, 16))).loss.backward()
        grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters())
        opt.step()
        state = sum(t.untyped_storage().nbytes() for s in opt.state.values() for k, t in s.items() if k != "step")
        est = estimate(shape, Workload(seq_len=16, micro_batch=2, fsdp=False, mixed_precision=False, load_bytes=4,
                                       optimizer="adamw_torch_fused" if fused else "adamw_torch"))
        assert grads == est.grads == 4 * shape.params
        assert state == est.optimizer == 8 * shape.params
        model.zero_grad(set_to_none=True)


def saved_activation_bytes(model, tokens: int) -> int:
    """Distinct non-parameter storages autograd keeps for backward in one forward of the decoder."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.nbytes():
            seen[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, use_cache=False)
    return sum(seen.values())


# Measured here with saved_tensors_hooks (bytes per token per decoder layer), recorded so that a change of
# transformers' Llama or of the formula shows up as a diff, with the formula's error against each.
MEASURED_PER_TOKEN_LAYER = {
    ("mha-64", "bfloat16"): 2584, ("mha-64", "float32"): 4632,          # formula: 2576 / 4624 (-0.3 %)
    ("gqa-128", "bfloat16"): 5544, ("gqa-128", "float32"): 10024,       # formula: 5536 / 10016 (-0.1 %)
    ("gqa-256", "bfloat16"): 11304, ("gqa-256", "float32"): 20520,      # formula: 11296 / 20512 (-0.1 %)
}
TOLERANCE = 0.02


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_activation_bytes_per_token_layer(name, dtype):
    h, i, heads, kv = SHAPES[name]
    tokens = 128
    per = []
    for layers in (1, 2):
        model, shape = llama(h, i, layers, heads, kv)
        model = model.to(getattr(torch, dtype)).train()
        per.append(saved_activation_bytes(model, tokens))
    measured = (per[1] - per[0]) / tokens
    assert measured == MEASURED_PER_TOKEN_LAYER[(name, dtype)]
    predicted = shape.activation_bytes_per_token_layer(2 if dtype == "bfloat16" else 4, gqa_kept=True)
    assert abs(predicted - measured) / measured < TOLERANCE, (predicted, measured)


def test_whole_forward_activations_within_tolerance():
    """All of a 4-layer forward (layers, final norm, embeddings) against the estimator's activation term."""
    model, shape = llama(128, 352, 4, 8, 2)
    model = model.to(torch.bfloat16).train()
    tokens = 256
    measured = saved_activation_bytes(model, tokens)
    est = estimate(shape, Workload(seq_len=tokens, micro_batch=1, fsdp=False, mixed_precision=True, load_bytes=2))
    per_layer = shape.activation_bytes_per_token_layer(2) * tokens
    predicted_saved = est.activations - per_layer          # the estimate also holds one layer of backward workspace
    assert abs(predicted_saved - measured) / measured < 0.10, (predicted_saved, measured)


def test_checkpointing_keeps_layer_inputs_only():
    shape = ModelShape.from_config(KNOWN_MODELS["TinyLlama/TinyLlama-1.1B-Chat-v1.0"])
    w = Workload(seq_len=2048, micro_batch=8, world=1)
    off, on = estimate(shape, w), estimate(shape, replace(w, checkpointing=True))
    per_layer = shape.activation_bytes_per_token_layer(2) * w.tokens
    layer_inputs = 22 * 2 * 2048 * w.tokens
    assert on.activations - layer_inputs - 2 * per_layer == off.activations - 23 * per_layer  # the same head
    assert off.activations > 5 * on.activations
    assert off.weights == on.weights == 4 * shape.params   # fp32 master under FSDP mixed precision


@pytest.mark.integration
def test_fsdp2_shard_bytes_per_rank(tmp_path):
    """Two gloo ranks, fully_shard per decoder layer + root: local shard bytes == estimate.weights (world 2)."""
    import subprocess

    script = tmp_path / "shard.py"
    script.write_text(f"""
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, {str(os.getcwd())!r})
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM
dist.init_process_group("gloo")
cfg = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=512)
m = LlamaForCausalLM(cfg)
for layer in m.model.layers:
    fully_shard(layer)
fully_shard(m)
local = sum(p.to_local().untyped_storage().nbytes() for p in m.parameters())
if dist.get_rank() == 0:
    print("SHARD", json.dumps({{"local": local, "full": sum(p.numel() for p in m.parameters()) * 4}}))
dist.destroy_process_group()
""")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = next(x for x in out.stdout.splitlines() if x.startswith("SHARD "))
    import json

    rec = json.loads(line[6:])
    _, shape = llama(128, 352, 2, 8, 2)
    est = estimate(shape, Workload(seq_len=16, micro_batch=1, world=2, fsdp=True, mixed_precision=True))
    assert rec["full"] == 4 * shape.params
    assert abs(rec["local"] - est.weights) / est.weights < 0.02, (rec, est.weights)


# --- the H200 points (seed-baseline.md): a documented sanity band ------------------------------------------------

H200 = {  # variant -> (measured GiB, workload)
    # seed: FSDP, gradient checkpointing, padded batches (SDPA with a mask), adamw_torch (foreach)
    "seed": (20.6, Workload(2048, 8, 1, True, True, 2, "adamw_torch", True, False, False, "dense_mask")),
    # seed without checkpointing, fused AdamW. The rows were padded to the longest in the batch (the data's
    # mean is 846 tokens), so the worst-case estimate (every row at 2048) is an upper bound here.
    "seed_nockpt": (38.2, Workload(2048, 8, 1, True, True, 2, "adamw_torch_fused", False, False, False,
                                   "dense_mask")),
    # tuned: TRL packing on SDPA (a T x T mask per layer), no checkpointing, fused AdamW
    "tuned": (56.2, Workload(2048, 8, 1, True, True, 2, "adamw_torch_fused", False, False, True, "dense_mask")),
}
BANDS = {"seed": (0.90, 1.10), "seed_nockpt": (1.00, 1.35), "tuned": (0.85, 1.15)}


@pytest.mark.parametrize("variant", H200)
def test_h200_sanity_band(variant):
    shape = ModelShape.from_config(KNOWN_MODELS["TinyLlama/TinyLlama-1.1B-Chat-v1.0"])
    measured, w = H200[variant]
    est = estimate(shape, w).peak / GiB
    lo, hi = BANDS[variant]
    assert lo * measured <= est <= hi * measured, (variant, est, measured)


# --- the chooser ---------------------------------------------------------------------------------------

TINYLLAMA = ModelShape.from_config(KNOWN_MODELS["TinyLlama/TinyLlama-1.1B-Chat-v1.0"])
LLAMA8B = ModelShape.from_config(KNOWN_MODELS["meta-llama/Llama-3.1-8B"])
LLAMA70B = ModelShape(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256)


def test_h200_1b_runs_without_checkpointing():
    c = choose(TINYLLAMA, Workload(2048, 8, 1), 139.8)
    assert (c.fits, c.checkpointing, c.cpu_offload, c.micro_batch) == (True, False, False, 8)
    assert c.reason.startswith("fits:")


def test_small_gpu_shrinks_the_micro_batch_then_checkpoints():
    c = choose(TINYLLAMA, Workload(2048, 8, 1), 40.0, grad_accum=2)
    assert c.fits and not c.checkpointing and c.micro_batch == 4 and c.grad_accum == 4  # same global batch
    c = choose(TINYLLAMA, Workload(2048, 8, 1), 24.0)
    assert c.fits and c.checkpointing and not c.cpu_offload


def test_user_fixed_choices_restrict_the_search():
    c = choose(TINYLLAMA, Workload(2048, 8, 1), 139.8, checkpointing=True)
    assert c.checkpointing and c.fits
    c = choose(TINYLLAMA, Workload(2048, 8, 1), 24.0, checkpointing=False, shrink_micro_batch=False)
    assert not c.fits and "cannot fit" in c.reason


def test_8b_on_8_gpus_and_70b_on_one():
    c = choose(LLAMA8B, Workload(4096, 2, world=8), 79.0)
    assert c.fits and not c.cpu_offload
    c = choose(LLAMA70B, Workload(4096, 1, world=1), 79.0)
    assert c.fits and c.cpu_offload and c.checkpointing      # only by offloading the state to the host
    c = choose(LLAMA70B, Workload(4096, 1, world=1), 79.0, cpu_offload=False)
    assert not c.fits and c.reason.startswith("cannot fit: at best")
    c = choose(LLAMA70B, Workload(4096, 1, world=1, fsdp=False), 79.0)
    assert not c.fits and "CPU offload" not in c.reason


def test_read_model_shape(tmp_path):
    assert read_model_shape(None)[0] is None
    assert read_model_shape("meta-llama/Llama-3.1-8B")[0] == LLAMA8B
    shape, why = read_model_shape(str(tmp_path))
    assert shape is None and "not found" in why
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    shape, why = read_model_shape(str(tmp_path))
    assert shape is None and "num_attention_heads" in why
    _, ref = llama(64, 128, 2, 4, 2)
    (tmp_path / "config.json").write_text(__import__("json").dumps(
        {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB}))
    got = read_model_shape(str(tmp_path))[0]
    assert (got.params, got.d, got.num_key_value_heads) == (ref.params, ref.d, ref.num_key_value_heads)

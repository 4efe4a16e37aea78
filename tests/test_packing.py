"""Packing without cross-contamination: packed loss == unpacked loss, on CPU, in fp32.

``orchestrate_varlen`` (orchestrator/worker/varlen_attn.py) is the attention the plan chooses for packed
(padding-free) rows. The checks, from the kernel up to a real 2-rank run:

* model level: TRL's padding-free collator packs 4 documents into one row; the loss and the gradients
  equal those of the same documents in a padded batch (SDPA), and differ from the same row without
  document boundaries (so the check can tell contamination apart);
* trainer level: SFTTrainer with ``packing=True`` (BFD) + ``orchestrate_varlen`` gives the same loss on
  the demo data as SFTTrainer without packing (SDPA, padded);
* integration: the plan's defaults on the demo model through torchrun with 2 CPU ranks (FSDP2) train
  with finite, decreasing loss.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from orch_helpers import run_attempt_directly

from orchestrator.worker.varlen_attn import NAME, _cuda_varlen, cu_seqlens_from_position_ids, register

REPO = Path(__file__).resolve().parents[1]
LENGTHS = (7, 13, 5, 20)


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    register()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).float()


def batches():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    g = torch.Generator().manual_seed(1)
    docs = [{"input_ids": torch.randint(3, 100, (n,), generator=g).tolist()} for n in LENGTHS]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(docs)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(docs)
    return padded, packed


def loss_and_grads(model, impl: str, batch: dict, **kw):
    """Sum of token NLL / number of label tokens (TRL's normalisation), and the parameter gradients."""
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, **kw)
    logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum") / (labels != -100).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_packed_loss_and_grads_equal_unpacked(tiny_model):
    padded, packed = batches()
    assert packed["input_ids"].shape == (1, sum(LENGTHS))            # one row, no padding
    assert packed["cu_seq_lens_q"].tolist() == [0, 7, 20, 25, 45]
    ref_loss, ref_grads = loss_and_grads(tiny_model, "sdpa", padded, use_cache=False)
    loss, grads = loss_and_grads(tiny_model, NAME, packed, use_cache=False)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-6), (loss.item(), ref_loss.item())
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6), name

    # The same row with no document boundaries (plain causal over the packed row) is measurably different:
    naive = {"input_ids": packed["input_ids"], "labels": packed["labels"],
             "attention_mask": torch.ones_like(packed["input_ids"])}
    contaminated, _ = loss_and_grads(tiny_model, "sdpa", naive, use_cache=False)
    assert abs(contaminated.item() - ref_loss.item()) > 1e-3


def test_boundaries_from_position_ids_and_with_a_cache(tiny_model):
    """Without cu_seq_lens (only position_ids), and with use_cache on (transformers' SDPA then loses the
    packed mask), the varlen path still keeps documents apart."""
    padded, packed = batches()
    ref, _ = loss_and_grads(tiny_model, "sdpa", padded, use_cache=False)
    only_pos = {k: packed[k] for k in ("input_ids", "labels", "position_ids")}
    loss, _ = loss_and_grads(tiny_model, NAME, only_pos, use_cache=True)
    assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-6)


def test_padded_batches_fall_back_to_sdpa(tiny_model):
    padded, _ = batches()
    ref, _ = loss_and_grads(tiny_model, "sdpa", padded, use_cache=False)
    loss, _ = loss_and_grads(tiny_model, NAME, padded, use_cache=False)
    assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-6)


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 5, 9]
    assert cu_seqlens_from_position_ids(torch.tensor([[3, 4, 0, 1]])).tolist() == [0, 2, 4]


def test_cuda_kernel_signature_is_understood():
    """The installed torch's varlen_attn is introspected (the CUDA path itself needs a GPU: bench/README.md)."""
    found = _cuda_varlen()
    if found is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    fn, extra, has_gqa = found
    assert callable(fn) and (extra.get("is_causal") is True or extra.get("window_size") == (-1, 0))


# --- trainer level: TRL packing (BFD) + orchestrate_varlen == no packing ---------------------------------

def _trainer_loss(demo: Path, tmp: Path, packing: bool, attn: str, rows: int = 24) -> tuple[float, int]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    register()
    data = [json.loads(line) for line in (demo / "data" / "train_dataset.json").read_text().splitlines()[:rows]]
    tok = AutoTokenizer.from_pretrained(demo / "model")
    model = AutoModelForCausalLM.from_pretrained(demo / "model", dtype=torch.float32, attn_implementation=attn)
    args = SFTConfig(output_dir=str(tmp / f"out-{packing}"), max_length=256, packing=packing,
                     per_device_train_batch_size=rows, use_cpu=True, bf16=False, report_to="none",
                     activation_checkpointing=False, dataloader_num_workers=0, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    n_label = int((batch["labels"][:, 1:] != -100).sum())
    assert ("cu_seq_lens_q" in batch) is packing   # packed: one padding-free row with document boundaries
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return float(loss), n_label


def test_sft_trainer_packed_equals_unpacked(demo_assets, tmp_path):
    unpacked, n1 = _trainer_loss(demo_assets, tmp_path, packing=False, attn="sdpa")
    packed, n2 = _trainer_loss(demo_assets, tmp_path, packing=True, attn=NAME)
    assert n1 == n2                              # the same label tokens, packed or padded
    assert math.isclose(packed, unpacked, rel_tol=1e-5), (packed, unpacked)


# --- integration: the plan's defaults through torchrun, 2 CPU ranks --------------------------------------

@pytest.mark.integration
def test_worker_with_plan_defaults_trains(demo_assets, tmp_path):
    import yaml
    from helpers import model_of

    from orchestrator.config import load_config
    from orchestrator.plan import make_plan
    from orchestrator.plan.topology import Topology
    from orchestrator.worker import channel

    cfg_path = tmp_path / "job.yaml"
    demo_yaml = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    demo_yaml.update({"model_id": str(demo_assets / "model"), "dataset_path": str(demo_assets / "data"),
                      "max_steps": 16, "logging_steps": 2, "save_strategy": "no"})
    for key in ("packing", "optim", "attn_implementation"):
        demo_yaml.pop(key, None)                 # the defaults decide
    demo_yaml["launch"] = {"name": "perf", "nproc_per_node": 2}
    cfg_path.write_text(yaml.safe_dump(demo_yaml))
    cfg = load_config(cfg_path, cwd=tmp_path)
    plan = make_plan(cfg, Topology(gpus=0, cpus=2), job_id="perf-0101-000000", home=tmp_path / "home",
                     python=sys.executable, worker_script=str(REPO / "train_worker.py"), workdir=str(tmp_path),
                     model=model_of(cfg))
    wc = plan.worker_config
    assert (wc["packing"], wc["attn_implementation"], wc["optim"]) == (True, NAME, "adamw_torch_fused")
    assert wc["activation_checkpointing"] is False
    paths = plan.paths
    rc, text = run_attempt_directly(plan, wc, tmp_path, timeout=300)
    recs = channel.read_progress(paths.progress)
    losses = [r["loss"] for r in recs if r["event"] == "log"]
    start = next(r for r in recs if r["event"] == "start")
    assert rc == 0, text[-3000:]
    assert start["world_size"] == 2 and start["fsdp_wrapped"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert json.loads(paths.status(1).read_text())["state"] == channel.WORKER_COMPLETED

"""How long a checkpoint save blocks training, and what it costs in lost work (issue 12).

One run, 2 ranks (gloo on CPU, NCCL on GPUs), a random Llama of ``--size`` (default ~134 M
parameters: hidden 768, 12 layers, vocabulary 32,000) under FSDP2 with AdamW after one training
step (so the optimizer has its state). Three ways to save model + optimizer, each ``--repeat``
times (median reported):

* **full-sync**: full state dicts gathered on rank 0 (``full_state_dict=True, cpu_offload=True``)
  and written there with ``torch.save``: what a FULL_STATE_DICT checkpoint does;
* **sharded-sync**: every rank writes its own shard with ``dcp.save``;
* **sharded-async**: orchestrate's path (``orchestrator.worker.async_save``, run as the save manager runs it): training
  is blocked only while the shards are staged (copied off the live tensors); a background thread
  writes them while training steps go on.

Blocked = time the training loop waits; write = until the checkpoint is on disk. Then the lost work
per failure each allows at a 1 % saving overhead: saving every ``interval = blocked / 0.01``, a
failure loses on average half an interval, plus (async) the write time, since a checkpoint counts
only once written.

    .venv/bin/python bench/checkpoint.py              # ~5 min on 2 CPU cores
    .venv/bin/python bench/checkpoint.py --size small # ~1 min, a 20 M model (smoke check)

Prints a Markdown table and one ``RESULT {...}`` JSON line (also ``<dir>/result.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = {"default": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                         num_key_value_heads=12, vocab_size=32000),
         "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=32000)}
OVERHEAD = 0.01


def build(size: str):
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[size], max_position_embeddings=256, tie_word_embeddings=False))
    params = sum(p.numel() for p in model.parameters())
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt, params


def train_step(model, opt) -> None:
    import torch

    ids = torch.randint(0, 32000, (2, 128))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def full_sync(model, opt, path: Path, rank: int) -> tuple[float, float]:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    t0 = time.perf_counter()
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_model_state_dict(model, options=o), get_optimizer_state_dict(model, opt, options=o)
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        torch.save(msd, path / "model.pt")
        torch.save(osd, path / "optimizer.pt")
    dist.barrier()
    t = time.perf_counter() - t0
    return t, t


def sharded_sync(model, opt, path: Path, rank: int) -> tuple[float, float]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    t0 = time.perf_counter()
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(path / "model"))
    dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(path / "optimizer"))
    t = time.perf_counter() - t0
    return t, t


def sharded_async(model, opt, path: Path, rank: int, writer) -> tuple[float, float]:
    """Orchestrate's path: stage (blocked), then training steps while the background write runs."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from orchestrator.worker.async_save import Stager, persist
    from orchestrator.worker.collectives import agree_all

    pool, group = writer
    t0 = time.perf_counter()
    stager = Stager()
    stager.stage(str(path / "model"), {"model": get_model_state_dict(model)})
    stager.stage(str(path / "optimizer"), {"optimizer": get_optimizer_state_dict(model, opt)})
    future = pool.submit(persist, stager.take(), group)
    blocked = time.perf_counter() - t0
    while not agree_all(future.done(), "cpu"):   # training steps go on meanwhile, the same number on every rank
        train_step(model, opt)
    future.result()
    return blocked, time.perf_counter() - t0


def worker(args) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import torch.distributed as dist

    from orchestrator.worker.collectives import side_groups

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, opt, params = build(args.size)
    train_step(model, opt)
    writer = (ThreadPoolExecutor(max_workers=1), side_groups()[1])   # the worker's background thread and group
    out = {"params": params, "world_size": dist.get_world_size()}
    root = Path(args.dir)
    for name in ("full-sync", "sharded-sync", "sharded-async"):
        runs = []
        for i in range(args.repeat):
            path = root / f"{name}-{i}"
            dist.barrier()
            if name == "full-sync":
                runs.append(full_sync(model, opt, path, rank))
            elif name == "sharded-sync":
                runs.append(sharded_sync(model, opt, path, rank))
            else:
                runs.append(sharded_async(model, opt, path, rank, writer))
            dist.barrier()
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)
        out[name] = {"blocked_s": statistics.median(b for b, _ in runs), "write_s": statistics.median(w for _, w in runs)}
    writer[0].shutdown(wait=True)
    if rank == 0:
        (root / "raw.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def report(raw: dict) -> dict:
    full = raw["full-sync"]["blocked_s"]
    rows = {}
    for name in ("full-sync", "sharded-sync", "sharded-async"):
        b, w = raw[name]["blocked_s"], raw[name]["write_s"]
        interval = b / OVERHEAD
        lost = interval / 2 + (w - b)        # a checkpoint counts once written
        rows[name] = {"blocked_s": round(b, 3), "write_s": round(w, 3), "blocked_vs_full": round(b / full, 3),
                      "interval_at_1pct_s": round(interval, 1), "lost_per_failure_s": round(lost, 1)}
    return {"params": raw["params"], "world_size": raw["world_size"], "modes": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary folder)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    root = Path(args.dir or tempfile.mkdtemp(prefix="orchestrate-ckpt-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, "--worker",
           "--size", args.size, "--repeat", str(args.repeat), "--dir", str(root)]
    subprocess.run(cmd, check=True, env=env)
    result = report(json.loads((root / "raw.json").read_text()))
    print(f"\n{result['params'] / 1e6:.0f} M parameters, {result['world_size']} ranks, model + AdamW state\n")
    print("| mode | blocked per save (s) | write (s) | blocked vs full-sync | save every (1 % overhead) | "
          "lost work per failure |")
    print("|---|---|---|---|---|---|")
    for name, r in result["modes"].items():
        print(f"| {name} | {r['blocked_s']:.2f} | {r['write_s']:.2f} | {100 * r['blocked_vs_full']:.0f} % | "
              f"{r['interval_at_1pct_s']:.0f} s | {r['lost_per_failure_s']:.0f} s |")
    print("RESULT " + json.dumps(result))
    (root / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

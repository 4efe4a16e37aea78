"""What the final-model check costs on a big folder: time and peak memory, then scaled to an 8B model (issue 16.1).

A synthetic Llama-3-8B-shaped folder (hidden 4096, 32 heads / 8 KV heads, MLP 14336, vocabulary 128,256,
bf16, untied) with ``--layers`` of its 32 decoder layers, written as sharded safetensors with an index
(``save_pretrained``'s layout) plus config and a tokenizer. While writing it, the worker's side is timed:
the digests of the in-memory tensors (:func:`orchestrator.worker.digests.state_digests`). Then the check
runs as the supervisor runs it (``python -m orchestrator.worker.export verify``, a process of its own):

* **cold**: the files evicted from the page cache first (``posix_fadvise(DONTNEED)``, as on a node that
  did not write them), so the disk is read;
* **warm**: again, the files in the page cache (the node that wrote them, memory permitting).

Reported: the folder's size, the worker's digest time, the check's wall time and its peak RSS (the
process's own ``ru_maxrss``: Python, torch and transformers imports included), and the time scaled
linearly by bytes to an 8B model in bf16 (16.06 GB) with the fixed start-up cost kept as measured (the
check streams the files while it loads config, tokenizer and model class: the two overlap).

    .venv/bin/python bench/final_check.py                  # 8 layers: a 5.6 GB folder, ~3 min on 2 cores
    .venv/bin/python bench/final_check.py --layers 2       # 2.9 GB (smoke check)

Prints a Markdown table and one ``RESULT {...}`` JSON line (also ``<dir>/result.json``). ``--keep`` keeps
the folder (default: removed at the end).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
BYTES_8B = 8_030_261_248 * 2          # Llama-3-8B's parameters in bf16


def _layer(i: int, h: int, kv: int, m: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h), p + "mlp.down_proj.weight": (h, m),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}


def shapes(layers: int) -> list[dict[str, tuple[int, ...]]]:
    """The tensors of each shard: embeddings; the layers two by two; final norm and lm_head."""
    h, m, v = LLAMA_8B["hidden_size"], LLAMA_8B["intermediate_size"], LLAMA_8B["vocab_size"]
    kv = h // LLAMA_8B["num_attention_heads"] * LLAMA_8B["num_key_value_heads"]
    out = [{"model.embed_tokens.weight": (v, h)}]
    for first in range(0, layers, 2):
        shard: dict = {}
        for i in range(first, min(first + 2, layers)):
            shard.update(_layer(i, h, kv, m))
        out.append(shard)
    out.append({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return out


def build(folder: Path, layers: int) -> tuple[dict, float, int]:
    """Write the folder; return (the worker's record, seconds its digests took, bytes)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from orchestrator.worker import digests
    from tests.test_final_model import tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**LLAMA_8B, num_hidden_layers=layers, dtype="bfloat16").save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    plan = shapes(layers)
    algo, tensors, weight_map, digest_s, total = digests.algorithm(), {}, {}, 0.0, 0
    gen = torch.Generator().manual_seed(0)
    for n, shard in enumerate(plan, start=1):
        name = f"model-{n:05d}-of-{len(plan):05d}.safetensors"
        state = {k: torch.randn(s, generator=gen, dtype=torch.float32).to(torch.bfloat16) for k, s in shard.items()}
        began = time.perf_counter()
        tensors.update(digests.state_digests(state, algo))
        digest_s += time.perf_counter() - began
        save_file(state, folder / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in state.values())
        weight_map.update({k: name for k in shard})
        del state
    (folder / digests.INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {"format": 1, "folder": str(folder), "algorithm": algo, "tensors": tensors}, digest_s, total


def evict(folder: Path) -> None:
    """Drop the folder's pages from the page cache (no root needed for files one owns)."""
    for path in folder.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def check(folder: Path, record: Path) -> dict:
    began = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "orchestrator.worker.export", "verify", str(folder), str(record)],
                       capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - began
    result = json.loads(r.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 2), "load_s": result.get("load_s"), "stream_s": result.get("stream_s"),
            "peak_rss_mb": result["peak_rss_mb"], "verdict": result["verdict"], "reason": result["reason"]}


def raw_read_s(folder: Path) -> float:
    """Seconds to read the folder's files once, cold, without hashing: what the disk allows."""
    evict(folder)
    buf = memoryview(bytearray(16 * 2**20))
    began = time.perf_counter()
    for path in folder.glob("*.safetensors"):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - began


def meta_build_s(layers: int) -> float:
    """Seconds to build the model on the meta device (the check does it once), imports already done."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    began = time.perf_counter()
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_8B, num_hidden_layers=layers))
    return time.perf_counter() - began


def scaled(run: dict, scale: float, extra_s: float) -> float:
    """The check's wall time for 8B: the streaming scaled by bytes, the rest as measured (+ a 32-layer meta
    model). The streaming overlaps the loading of config, tokenizer and model class (folder_check.py)."""
    overlap = max(run["load_s"], run["stream_s"])
    return round(run["wall_s"] - overlap + max(run["load_s"] + extra_s, run["stream_s"] * scale), 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dir", default="/tmp/orchestrate-bench-final-check")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    folder, record = base / "model", base / "final_model.json"
    record_data, digest_s, size = build(folder, args.layers)
    record.write_text(json.dumps(record_data))
    evict(folder)
    cold = check(folder, record)
    warm = check(folder, record)
    disk_s = raw_read_s(folder)
    meta_s = meta_build_s(args.layers)
    extra = max(0.0, meta_build_s(32) - meta_s)
    scale = BYTES_8B / size
    result = {"layers": args.layers, "bytes": size, "tensors": len(record_data["tensors"]), "cpus": os.cpu_count(),
              "worker_digest_s": round(digest_s, 2), "cold": cold, "warm": warm,
              "disk_read_cold_s": round(disk_s, 2), "meta_model_32_layers_extra_s": round(extra, 2),
              "scaled_8b": {"worker_digest_s": round(digest_s * scale, 1), "cold_wall_s": scaled(cold, scale, extra),
                            "warm_wall_s": scaled(warm, scale, extra),
                            "disk_read_cold_s": round(disk_s * scale, 1)}}
    gb = size / 1e9
    print("| | folder | worker digests | check wall | config, tokenizer, meta model / streaming (side by side) | "
          "peak RSS of the check | disk read alone |\n|---|---|---|---|---|---|---|")
    for name, run in (("cold", cold), ("warm", warm)):
        print(f"| {name} | {gb:.2f} GB, {result['tensors']} tensors | {digest_s:.1f} s | {run['wall_s']} s | "
              f"{run['load_s']} s / {run['stream_s']} s ({gb / run['stream_s']:.2f} GB/s) | {run['peak_rss_mb']} MiB | "
              f"{disk_s:.1f} s ({gb / disk_s:.2f} GB/s) |")
    s8 = result["scaled_8b"]
    print(f"| 8B bf16, scaled | 16.06 GB | {s8['worker_digest_s']} s | cold {s8['cold_wall_s']} s, warm "
          f"{s8['warm_wall_s']} s | streaming x {scale:.2f} | (does not grow with the model) | {s8['disk_read_cold_s']} s |")
    print("RESULT " + json.dumps(result))
    (base / "result.json").write_text(json.dumps(result, indent=1))
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if cold["verdict"] == warm["verdict"] == "verified" else 1


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput: the seed's way against orchestrate's worker with its defaults, in one run.

    python bench/throughput.py run --size 1b            # one H200: the issue-6 measurement (see bench/README.md)
    python bench/throughput.py run --size tiny          # CPU: a correctness smoke check only

Both variants train the same randomly initialised Llama (``--size``) on the same synthetic chat data
and tokenizer, which this script writes (the generator of ``shared/bench/seed_anchor.py``: same seeds,
same rows), at the same sequence length, micro-batch and step count:

(a) **seed**: TRL ``SFTTrainer`` exactly as users ran it: FSDP ``full_shard auto_wrap`` under
    ``ACCELERATE_USE_FSDP=1 FSDP_CPU_RAM_EFFICIENT_LOADING=1 torchrun``, gradient checkpointing
    (reentrant), padded batches, ``adamw_torch``, SDPA, bf16 (this file's ``seed-train``);
(b) **orchestrate**: the same job as a seed-format YAML with no performance keys, planned by
    ``orchestrator.config.load_config`` + ``orchestrator.plan.make_plan`` on this machine's detected
    topology, and run as the plan says (``plan.argv``: orchestrator.worker.agent -> torchrun -> train_worker.py
    with the plan's worker config and environment). Whatever the plan's defaults are, they are measured.

Reported per variant: useful (non-padding) tokens/s over steps ``warm..steps`` (TRL's own token count,
which counts real tokens only, padded or packed), MFU = 6 * N * tokens/s against a bf16 matmul peak
measured first on this machine, peak memory (GPU: rank 0's ``max_memory_allocated``; CPU: peak RSS of
the largest process), the final loss, and the ratio b/a. A table and one JSON line (``RESULT {...}``).
On CPU the MFU is ``n/a``: there is no meaningful bf16 matmul peak to hold it against.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIZES = {
    # TinyLlama-1.1B shape (seed-baseline.md)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
# Per size: rows, seq, micro-batch, steps, warm-up steps (timed: warm..steps), logging interval.
DEFAULTS = {
    "1b": dict(rows=3000, seq=2048, bs=8, steps=40, warm=10, log=5),
    "tiny": dict(rows=400, seq=1024, bs=4, steps=12, warm=4, log=2),
}
VOCAB = {"1b": 32000, "tiny": 8192}  # tiny: the tokenizer's 8000 (a 32000 head would be all the CPU time)
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
ALSO = {  # extra orchestrate rows: launch.performance overrides (diagnosis on the GPU)
    "compile": {"compile": True},
    "ckpt": {"activation_checkpointing": True},
    "nopack": {"packing": False},
    "sdpa": {"attention": "sdpa"},
    "noliger": {"liger": False},
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --- assets ---------------------------------------------------------------------------------------

def prepare(d: Path, size: str, rows: int) -> dict:
    """Model, tokenizer and chat data set (seed_anchor.py's generator); skipped when already there."""
    marker = d / f"prepared-{size}-{rows}.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(5000)]
    data = d / "data"
    data.mkdir(parents=True, exist_ok=True)
    out = []
    for _ in range(rows):
        u = " ".join(rng.choice(words) for _ in range(rng.randint(10, 150)))
        a = " ".join(rng.choice(words) for _ in range(rng.randint(30, 700)))
        out.append({"messages": [{"role": "system", "content": "You are helpful."},
                                 {"role": "user", "content": u},
                                 {"role": "assistant", "content": a}]})
    with open(data / "train_dataset.json", "w") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<pad>", "</s>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((m["content"] for r in out[:2000] for m in r["messages"]), trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    hf_tok.chat_template = TEMPLATE
    mdir = d / "model"
    hf_tok.save_pretrained(mdir)
    cfg = LlamaConfig(vocab_size=VOCAB[size], max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
                      bos_token_id=2, **SIZES[size])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(mdir)
    info = {"model": str(mdir), "data": str(data), "params": sum(p.numel() for p in model.parameters()),
            "size": size, "rows": rows}
    marker.write_text(json.dumps(info))
    return info


# --- the matmul peak --------------------------------------------------------------------------------

def measure_peak() -> dict:
    """bf16 matmul TFLOP/s on GPU 0 (8192^3, best of 3 timed batches); on CPU an fp32 figure, for the record."""
    import torch

    if torch.cuda.is_available():
        n, dtype, dev = 8192, torch.bfloat16, "cuda"
    else:
        n, dtype, dev = 1024, torch.float32, "cpu"
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best = 0.0
    iters = 20 if dev == "cuda" else 5
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync()
        best = max(best, 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12)
    name = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    return {"device": dev, "name": name, "dtype": str(dtype).replace("torch.", ""), "tflops": round(best, 1)}


# --- (a) seed-style training (runs under torchrun) -------------------------------------------------------

def seed_train(args) -> None:
    """seed_anchor.py's ``seed`` variant: what users ran, measured with TRL's own token count."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    d = Path(args.dir)
    mdir = d / "model"
    on_gpu = torch.cuda.is_available()
    fsdp = bool(os.environ.get("ACCELERATE_USE_FSDP"))
    cfg = SFTConfig(
        output_dir=str(d / "out-seed"), max_length=args.seq, per_device_train_batch_size=args.bs,
        max_steps=args.steps, learning_rate=2e-5, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=args.log, save_strategy="no", report_to="none", bf16=on_gpu, tf32=on_gpu if on_gpu else None,
        use_cpu=not on_gpu, dataloader_num_workers=2 if on_gpu else 0,
        fsdp="full_shard auto_wrap" if fsdp else "",
        fsdp_config={"backward_prefetch": "backward_pre", "forward_prefetch": False,
                     "use_orig_params": False} if fsdp else None,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True},
        packing=False, optim="adamw_torch", seed=42)
    tok = AutoTokenizer.from_pretrained(mdir)
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.bfloat16 if on_gpu else torch.float32,
                                                 attn_implementation="sdpa", use_cache=False)
    ds = load_dataset("json", data_files=str(d / "data" / "train_dataset.json"), split="train")
    marks: dict[int, tuple[float, int]] = {}
    losses: list[float] = []
    holder = {}

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step in (args.warm, args.steps):
                if on_gpu:
                    torch.cuda.synchronize()
                marks[state.global_step] = (time.perf_counter(), int(holder["t"]._total_train_tokens))

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    holder["t"] = trainer
    trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        (t0, k0), (t1, k1) = marks[args.warm], marks[args.steps]
        print("SEED " + json.dumps({
            "s_per_step": (t1 - t0) / (args.steps - args.warm), "useful_tokens": k1 - k0, "seconds": t1 - t0,
            "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
            "distributed_type": str(getattr(trainer.accelerator.distributed_type, "value", "")),
            "final_loss": losses[-1] if losses else None, "losses": losses}), flush=True)


# --- running the variants ------------------------------------------------------------------------------

def _run(cmd: list[str], env: dict, cwd: Path, log_path: Path, timeout: float) -> tuple[int, str, float]:
    """Run ``cmd`` through ``rss-wrap`` (which reports the peak RSS of its largest descendant)."""
    wrapped = [sys.executable, str(Path(__file__).resolve()), "rss-wrap", "--", *cmd]
    log(f"$ {' '.join(cmd)}   (log: {log_path})")
    with open(log_path, "w") as f:
        try:
            p = subprocess.run(wrapped, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=f, text=True,
                               timeout=timeout)
            out, rc = p.stdout, p.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), 124
    rss = 0.0
    for line in out.splitlines():
        if line.startswith("RSS_GIB "):
            rss = float(line.split()[1])
    return rc, out, rss


def run_seed(args, d: Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           str(Path(__file__).resolve()), "seed-train", "--dir", str(d), "--seq", str(args.seq), "--bs", str(args.bs),
           "--steps", str(args.steps), "--warm", str(args.warm), "--every", str(args.log)]
    env = {**env, "ACCELERATE_USE_FSDP": "1", "FSDP_CPU_RAM_EFFICIENT_LOADING": "1"}
    rc, out, rss = _run(cmd, env, d, d / "seed.log", args.timeout)
    rec = next((json.loads(line[5:]) for line in out.splitlines() if line.startswith("SEED ")), None)
    if rc != 0 or rec is None:
        raise SystemExit(f"seed variant failed (exit {rc}); see {d / 'seed.log'}")
    rec["rss_gib"] = rss
    return rec


def bench_yaml(args, d: Path, on_gpu: bool, performance: dict | None) -> str:
    """The seed's job in the seed's YAML form: no packing/optim/checkpointing keys, so the plan's defaults apply."""
    import yaml

    cfg = {
        "model_id": str(d / "model"), "dataset_path": str(d / "data"), "max_length": args.seq,
        "per_device_train_batch_size": args.bs, "max_steps": args.steps, "learning_rate": 2e-5,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "logging_steps": args.log, "save_strategy": "no",
        "report_to": "none", "seed": 42, "fsdp": "full_shard auto_wrap",
        "dataloader_num_workers": 2 if on_gpu else 0,
    }
    if on_gpu:
        cfg.update({"bf16": True, "tf32": True, "dtype": "bfloat16"})
    else:
        cfg.update({"bf16": False})
    cfg["launch"] = {"name": "bench", "nproc_per_node": args.nproc}
    if performance:
        cfg["launch"]["performance"] = performance
    return yaml.safe_dump(cfg, sort_keys=False)


def run_orchestrate(args, d: Path, env: dict, label: str, performance: dict | None) -> dict:
    """Plan the job with orchestrate's own functions and run exactly what the plan says."""
    import torch
    import yaml

    from orchestrator.config import load_config
    from orchestrator.dashboard.plan_view import describe_plan
    from orchestrator.plan import make_plan
    from orchestrator.plan.inputs import default_worker_script, detect_topology, read_model_shape

    on_gpu = torch.cuda.is_available()
    cfg_path = d / f"{label}.yaml"
    cfg_path.write_text(bench_yaml(args, d, on_gpu, performance))
    cfg = load_config(cfg_path, cwd=d)
    job_id = f"bench-{label}-{time.strftime('%H%M%S')}"
    plan = make_plan(cfg, detect_topology(), job_id=job_id, home=d / "home", python=sys.executable,
                     worker_script=default_worker_script(), workdir=str(d),
                     model=read_model_shape(cfg.training.get("model_id")))
    text = describe_plan(plan)
    (d / f"{label}.plan.txt").write_text(text)
    log(f"{label}: plan written to {d / f'{label}.plan.txt'}; performance section:\n" + "\n".join(
        line for line in text.splitlines()[text.splitlines().index(next(
            l for l in text.splitlines() if l.startswith("performance"))):]))
    paths = plan.paths
    paths.attempt_dir(1).mkdir(parents=True, exist_ok=True)
    paths.worker_config.write_text(yaml.safe_dump(dict(plan.worker_config), sort_keys=True))
    run_env = {**env, **plan.attempt_env(1, None)}
    rc, _, rss = _run(plan.argv(1), run_env, Path(plan.workdir), d / f"{label}.log", args.timeout)
    recs = [json.loads(line) for line in paths.progress.read_text().splitlines()] if paths.progress.is_file() else []
    logs = {r["step"]: r for r in recs if r.get("event") == "log"}
    if rc != 0 or args.warm not in logs or args.steps not in logs:
        raise SystemExit(f"{label} variant failed (exit {rc}); see {d / f'{label}.log'} and {paths.run_dir}")
    a, b = logs[args.warm], logs[args.steps]
    start = next((r for r in recs if r.get("event") == "start"), {})
    return {"s_per_step": (b["time"] - a["time"]) / (args.steps - args.warm), "useful_tokens": b["tokens"] - a["tokens"],
            "seconds": b["time"] - a["time"], "max_memory_gib": b.get("max_memory_gib"), "rss_gib": rss,
            "distributed_type": start.get("distributed_type"), "final_loss": b["loss"],
            "losses": [logs[s]["loss"] for s in sorted(logs)],
            "performance": {c["name"]: c["value"] for c in plan.performance.get("choices", [])},
            "memory_estimate_gib": (plan.performance.get("memory") or {}).get("estimate_gib")}


def run(args) -> int:
    import torch

    for k, v in DEFAULTS[args.size].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps % args.log or args.warm % args.log or args.warm >= args.steps:
        raise SystemExit("--warm and --steps must be multiples of --log, warm < steps")
    d = Path(args.dir or f"/tmp/orchestrate-bench-{args.size}").absolute()
    d.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATE_", "ACCELERATE_", "FSDP_"))}
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.nproc)))
    t0 = time.time()
    info = prepare(d, args.size, args.rows)
    log(f"assets in {d} ({info['params'] / 1e9:.3f} B parameters) after {time.time() - t0:.0f} s")
    peak = json.loads(subprocess.run([sys.executable, str(Path(__file__).resolve()), "peak"], check=True,
                                     stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1])
    log(f"matmul peak: {peak}")
    rows = {"seed": run_seed(args, d, env)}
    rows["orchestrate"] = run_orchestrate(args, d, env, "orchestrate", None)
    for name in args.also:
        rows[f"orchestrate+{name}"] = run_orchestrate(args, d, env, f"orchestrate-{name}", ALSO[name])
    world = args.nproc
    n = info["params"]
    for r in rows.values():
        r["useful_tokens_per_s"] = r["useful_tokens"] / r["seconds"]
        r["mfu_6N"] = (6 * n * r["useful_tokens_per_s"] / (peak["tflops"] * 1e12 * world)) if on_gpu else None
    base = rows["seed"]["useful_tokens_per_s"]
    for r in rows.values():
        r["ratio_vs_seed"] = r["useful_tokens_per_s"] / base
    print_table(args, info, peak, rows, on_gpu)
    result = {"size": args.size, "params": n, "seq": args.seq, "micro_batch": args.bs, "steps": args.steps,
              "warm": args.warm, "world": world, "peak": peak, "torch": torch.__version__,
              "variants": {k: {kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in r.items()
                               if kk != "losses"} for k, r in rows.items()},
              "ratio_b_over_a": round(rows["orchestrate"]["ratio_vs_seed"], 3)}
    problems = [f"{k}: non-finite loss" for k, r in rows.items()
                if not all(x == x and abs(x) != float("inf") for x in r["losses"])]
    result["problems"] = problems
    print("RESULT " + json.dumps(result), flush=True)
    (d / "result.json").write_text(json.dumps(result, indent=1))
    return 1 if problems else 0


def print_table(args, info, peak, rows, on_gpu) -> None:
    mem_head = "peak GPU mem" if on_gpu else "peak RSS"
    print(f"\n{args.size}: {info['params'] / 1e9:.3f} B parameters, seq {args.seq}, micro-batch {args.bs}, "
          f"{args.nproc} process(es), timed steps {args.warm}..{args.steps}; matmul peak {peak['tflops']} TFLOP/s "
          f"({peak['dtype']}, {peak['name']})")
    print(f"| variant | s/step | useful tokens/s | MFU (6N) | {mem_head} | final loss | b/a |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        mem = r["max_memory_gib"] if on_gpu else r["rss_gib"]
        mfu = f"{100 * r['mfu_6N']:.1f} %" if r["mfu_6N"] is not None else "n/a (CPU)"
        print(f"| {name} | {r['s_per_step']:.3f} | {r['useful_tokens_per_s']:,.0f} | {mfu} | "
              f"{mem if mem is not None else '?'} GiB | {r['final_loss']:.3f} | {r['ratio_vs_seed']:.2f}x |")
    print()


def rss_wrap(cmd: list[str]) -> int:
    p = subprocess.run(cmd, stderr=None)
    kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"RSS_GIB {kib / 2**20:.3f}", flush=True)
    return p.returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rss-wrap"]:
        return rss_wrap(argv[argv.index("--") + 1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="prepare, measure the peak, run (a) seed and (b) orchestrate, print the table")
    r.add_argument("--size", choices=sorted(SIZES), default="tiny")
    r.add_argument("--dir", default=None, help="work folder (default /tmp/orchestrate-bench-SIZE); assets are reused")
    for k in ("rows", "seq", "bs", "steps", "warm", "log"):
        r.add_argument(f"--{k}", type=int, default=None)
    r.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per variant")
    r.add_argument("--also", nargs="*", default=[], choices=sorted(ALSO),
                   help="extra orchestrate rows with one default switched (diagnosis)")
    r.add_argument("--timeout", type=float, default=1800, help="seconds per variant")
    s = sub.add_parser("seed-train", help="(internal, under torchrun) the seed-style variant")
    s.add_argument("--dir", required=True)
    for k in ("seq", "bs", "steps", "warm"):
        s.add_argument(f"--{k}", type=int, required=True)
    s.add_argument("--every", dest="log", type=int, required=True)  # not --log: torchrun would take it
    sub.add_parser("peak", help="(internal) print the matmul peak as JSON")
    pr = sub.add_parser("prepare", help="only write the assets")
    pr.add_argument("--dir", required=True)
    pr.add_argument("--size", choices=sorted(SIZES), default="tiny")
    pr.add_argument("--rows", type=int, default=None)
    args = p.parse_args(argv)
    if args.cmd == "run":
        return run(args)
    if args.cmd == "seed-train":
        seed_train(args)
        return 0
    if args.cmd == "peak":
        print(json.dumps(measure_peak()))
        return 0
    print(json.dumps(prepare(Path(args.dir), args.size, args.rows or DEFAULTS[args.size]["rows"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

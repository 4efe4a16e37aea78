"""The GPU acceptance run (issue 18.4): what the first GPU must settle, in one run and one table.

    bash bench/gpu_acceptance.sh               # one H100/H200, <= 8 minutes (see bench/README.md)
    bash bench/gpu_acceptance.sh --cpu-smoke   # the same steps on CPU in a few minutes (CI runs it)

Steps, each a row (PASS, FAIL or n/a) with its figure:

1. throughput: ``bench/throughput.py`` on the 1.1 B model, seed-style against orchestrate: tokens/s, MFU;
2. memory: the plan's per-GPU estimate against the measured peak of that orchestrate run (within 25 %);
3. a bf16 job (``orchestrate submit``) that ends COMPLETED with its final model verified;
4. in that job, a kill -9 of a rank and the resume: KILLED then COMPLETED, resumed from a checkpoint, the
   recovery time (fault -> next step; a spare attempt is allowed, ``ORCHESTRATE_SPARE_AFTER_S=0``);
5. a CUDA out-of-memory (another process holds all but 8 GiB of the GPU while a 1.1 B job trains):
   classified OOM, not retried, the plan's advice (micro-batch, activation checkpointing) in the message;
6. the varlen flash path: the kernel is called and agrees with per-document SDPA, and the orchestrate run
   left no "fell back" notice.

``--cpu-smoke`` runs every step on CPU with tiny sizes so that the script cannot rot without a GPU; where
CPU cannot say anything (MFU, the estimate, flash) the row says n/a, and the out-of-memory error is the
worker's test-only ``oom`` fault instead of a real allocator failure. Exit status 1 if any row FAILs.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

ROWS: list[tuple[str, str, str, str]] = []   # (check, verdict, figure, detail)
ADVICE_WORDS = ("per_device_train_batch_size", "activation_checkpointing")


def row(check: str, ok: bool | None, figure: str, detail: str = "") -> None:
    ROWS.append((check, "n/a" if ok is None else ("PASS" if ok else "FAIL"), figure, detail))
    print(f"[acceptance] {check}: {ROWS[-1][1]} {figure} {detail}", file=sys.stderr, flush=True)


def orch(home: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATE_")}
    full.update(ORCHESTRATE_HOME=str(home), PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=full, capture_output=True,
                          text=True, timeout=timeout, cwd=home.parent)


def status(home: Path, job_id: str) -> dict:
    return json.loads(orch(home, "status", job_id, "--json").stdout)


def records(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "progress.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def wait(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(what)


def submit(home: Path, cfg: dict, name: str, env: dict | None = None) -> tuple[str, str]:
    import yaml

    home.mkdir(parents=True, exist_ok=True)
    path = home.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = orch(home, "submit", "--detach", str(path), env=env)
    if r.returncode != 0:
        raise RuntimeError(f"submit {name}: {r.stderr.strip()[-800:]}")
    job_id = r.stdout.strip()
    return job_id, status(home, job_id)["run_dir"]


def end_of(home: Path, job_id: str, timeout: float) -> dict:
    return wait(lambda: (lambda j: j if j["state"] in ("COMPLETED", "FAILED", "CANCELLED") else None)(
        status(home, job_id)), timeout, f"{job_id} to end")


# --- 1, 2: throughput and the memory estimate ------------------------------------------------------------

def throughput(work: Path, smoke: bool) -> dict | None:
    tiny = ["--size", "tiny", "--steps", "4", "--warm", "2", "--log", "2", "--rows", "48", "--seq", "128", "--bs", "2"]
    size = tiny if smoke else ["--size", "1b", "--steps", "30", "--warm", "10", "--log", "5", "--rows", "1000"]
    cmd = [sys.executable, str(REPO / "bench" / "throughput.py"), "run", *size, "--dir", str(work / "throughput"),
           "--timeout", "300"]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    (work / "throughput.log").write_text(p.stderr + p.stdout)
    result = next((json.loads(x[7:]) for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if result is None:
        row("throughput (seed vs orchestrate)", False, "-",
            f"failed (exit {p.returncode}): {work / 'throughput.log'}")
        return None
    v = result["variants"]
    for name in ("seed", "orchestrate"):
        mfu = v[name].get("mfu_6N")
        row(f"throughput: {name}", not result["problems"], f"{v[name]['useful_tokens_per_s']:,.0f} tokens/s",
            f"MFU {100 * mfu:.1f} %" if mfu is not None else "MFU n/a (CPU)")
    ratio = result["ratio_b_over_a"]
    row("throughput: orchestrate / seed", not result["problems"], f"{ratio:.2f}x",
        "CPU: says nothing of GPU speed" if smoke else ("target >= 3x met" if ratio >= 3 else "below the 3x target"))
    est, peak = v["orchestrate"].get("memory_estimate_gib"), v["orchestrate"].get("max_memory_gib")
    est = est.get("peak") if isinstance(est, dict) else est     # the plan's parts; their peak is the estimate
    if est is None or peak is None:
        row("memory: plan estimate vs measured peak", None, f"estimate {est} GiB, peak {peak} GiB",
            "no GPU memory on CPU" if smoke else "a figure is missing")
    else:
        row("memory: plan estimate vs measured peak", abs(est - peak) <= 0.25 * peak,
            f"estimate {est:.1f} GiB, peak {peak:.1f} GiB", f"{100 * (est - peak) / peak:+.0f} % (within 25 % passes)")
    return result


# --- 3, 4: a bf16 job, a kill -9 of a rank, the resume, the final model ------------------------------------

def small_model(work: Path, smoke: bool) -> tuple[Path, Path]:
    """GPU: a 30 M Llama with 64-wide heads (flash-friendly) on the throughput data; CPU: the demo model."""
    if smoke:
        from orchestrator.demo import prepare_demo

        assets = prepare_demo(work / "demo")
        return assets / "model", assets / "data"
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src, out = work / "throughput", work / "small-model"
    if not (out / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(src / "model")
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
        tok.save_pretrained(out)
    return out, src / "data"


def job_config(model: Path, data: Path, smoke: bool, name: str, **extra) -> dict:
    cfg = {"model_id": str(model), "dataset_path": str(data), "bf16": True, "learning_rate": 1e-4,
           "lr_scheduler_type": "constant", "warmup_steps": 0, "logging_steps": 1, "report_to": "none", "seed": 42,
           "max_length": 128 if smoke else 1024, "per_device_train_batch_size": 4 if smoke else 8,
           "max_steps": 8 if smoke else 30, "save_steps": 4 if smoke else 10,
           "launch": {"name": name, "nproc_per_node": 2 if smoke else 1, "retry": {"backoff_s": 1}}}
    if smoke:
        cfg.update(fsdp=True, fsdp_config={"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"},
                   activation_checkpointing=False)
    cfg.update(extra)
    return cfg


def lifecycle(work: Path, smoke: bool) -> None:
    from orchestrator.backends.processes import rank_pids

    model, data = small_model(work, smoke)
    home = work / "jobs" / "home"
    job_id, run_dir = submit(home, job_config(model, data, smoke, "bf16-kill"), "bf16-kill",
                             env={"ORCHESTRATE_SPARE_AFTER_S": "0"})
    kill_after = 5 if smoke else 14
    wait(lambda: any(r["event"] == "log" and r["step"] >= kill_after for r in records(run_dir)), 300,
         f"step {kill_after}")
    pids = wait(lambda: rank_pids(job_id), 30, "the ranks")
    t_fault = time.time()
    os.kill(pids[max(pids)], signal.SIGKILL)
    job = end_of(home, job_id, 420)
    failures = [a["failure"] for a in job["attempts"]]
    row("bf16 job COMPLETED, final model verified", job["state"] == "COMPLETED" and bool(job.get("final_model")),
        job["state"], f"final model: {job.get('final_model')}" if job.get("final_model") else job.get("message", ""))
    second = [r for r in records(run_dir) if r["event"] == "log" and r["attempt"] == 2]
    resumed = job["attempts"][1]["resumed_from"] if len(job["attempts"]) > 1 else None
    spare = (Path(run_dir) / "attempts" / "2" / "spare.json").is_file()
    recovery = f"{second[0]['time'] - t_fault:.1f} s to the next step" if second else "no step after the kill"
    row(f"kill -9 of rank {max(pids)}, then resume", failures == ["KILLED", "COMPLETED"] and bool(resumed),
        recovery, f"{' -> '.join(failures)}; resumed from {Path(resumed).name if resumed else None}"
                  f"{'; handed to a spare attempt' if spare else ''}")


# --- 5: out of memory -------------------------------------------------------------------------------------

def out_of_memory(work: Path, smoke: bool) -> None:
    home = work / "jobs" / "home"
    ballast = None
    if smoke:
        model, data = small_model(work, smoke)
        cfg, env = job_config(model, data, smoke, "oom", max_steps=4), {"ORCHESTRATE_FAULT": "oom:0:2"}
        cfg["launch"]["nproc_per_node"] = 1   # one rank is enough to fail (CI's CPU time)
    else:
        src = work / "throughput"
        cfg, env = job_config(src / "model", src / "data", smoke, "oom", max_steps=10, max_length=2048), {}
        code = ("import torch, time; free, _ = torch.cuda.mem_get_info(); x = torch.empty(free - 8 * 2**30, "
                "dtype=torch.uint8, device='cuda'); print('ready', flush=True); time.sleep(900)")
        ballast = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        ballast.stdout.readline()
    try:
        job_id, _ = submit(home, cfg, "oom", env=env)
        job = end_of(home, job_id, 300)
    finally:
        if ballast is not None:
            ballast.kill()
            ballast.wait()
    failures = [a["failure"] for a in job["attempts"]]
    advice = all(w in (job.get("message") or "") for w in ADVICE_WORDS)
    row("CUDA out of memory: OOM, not retried, plan's advice", failures == ["OOM"] and job["state"] == "FAILED"
        and advice, " -> ".join(failures), (job.get("message") or "")[:160] + (" (injected: CPU)" if smoke else ""))


# --- 6: the varlen flash path -------------------------------------------------------------------------------

def varlen(work: Path, smoke: bool) -> None:
    import functools

    import torch
    import torch.nn.functional as F

    from orchestrator.worker import varlen_attn as va

    dev, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    calls = []
    kernels = None
    try:
        import torch.nn.attention.varlen as kernels

        real = kernels.varlen_attn

        @functools.wraps(real)
        def counted(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)
        kernels.varlen_attn = counted
    except ImportError:   # this torch has no varlen kernel: the per-document path is all there is
        pass
    va._cuda_varlen.cache_clear()   # it resolves the kernel once: let it find the counting one
    try:
        torch.manual_seed(0)
        docs, heads, kv, d = (40, 31, 25), 8, 4, 64
        q, k, v = (torch.randn(1, n, sum(docs), d, device=dev, dtype=dtype) for n in (heads, kv, kv))
        pos = torch.cat([torch.arange(n) for n in docs]).to(dev)[None]
        out, _ = va.varlen_attention_forward(None, q, k, v, None, scaling=d ** -0.5, position_ids=pos)
        bounds = [0, *torch.tensor(docs).cumsum(0).tolist()]
        ref = torch.cat([F.scaled_dot_product_attention(  # each document alone, causal, in float32
            q[:, :, s:e].float(), k[:, :, s:e].float(), v[:, :, s:e].float(), is_causal=True, scale=d ** -0.5,
            enable_gqa=True).transpose(1, 2) for s, e in zip(bounds[:-1], bounds[1:])], dim=1)
        diff = (out.float() - ref).abs().max().item()
    finally:
        if kernels is not None:
            kernels.varlen_attn = real
        va._cuda_varlen.cache_clear()
    notices = [r for p in (work / "throughput").glob("home/runs/*/progress.jsonl") for r in records(str(p.parent))
               if r.get("event") == "notice" and "varlen" in str(r.get("message"))]
    used = bool(calls) if not smoke else va.kernel_in_use(dev) == "per-document SDPA"
    row("varlen flash path used (not fallen back)", used and diff < 3e-2 and not notices,
        va.kernel_in_use(dev), f"kernel calls {len(calls)}; max |diff| vs per-document SDPA {diff:.1e}; fallback "
        f"notices in the run: {len(notices)}" + ("; CPU: flash n/a, the per-document path checked" if smoke else ""))


# What the run imports besides torch: module -> (supported major versions or None, the wheels it needs).
NEEDS = {
    "trl": (None, ["trl"]), "datasets": (None, ["datasets", "dill", "multiprocess", "xxhash", "fsspec"]),
    "psutil": (None, ["psutil"]), "rich": (None, ["rich", "markdown_it_py", "mdurl", "pygments"]),
    "submitit": (None, ["submitit", "cloudpickle"]), "yaml": (None, ["pyyaml"]),
    "transformers": ((5, 6), ["transformers", "tokenizers", "huggingface_hub", "hf_xet", "kernels", "safetensors",
                              "typer", "shellingham"]),
    "accelerate": ((1, 2), ["accelerate"]),
}


def wheels_needed(folder: Path) -> list[str]:
    """The wheels in ``folder`` of what this Python lacks (or has outside the supported major versions)."""
    import importlib.util
    import re
    from importlib.metadata import version

    names = set()
    for module, (majors, wheels) in NEEDS.items():
        ok = importlib.util.find_spec(module) is not None
        if ok and majors:
            ok = majors[0] <= int(re.match(r"\d+", version(module)).group()) < majors[1]
        if not ok:
            names.update(wheels)
    return sorted(str(w) for w in folder.glob("*.whl") if re.sub(r"[-_.]+", "_", w.name.split("-")[0]).lower() in names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--dir", default=None, help="work folder (default: /tmp/orchestrate-acceptance[-smoke])")
    ap.add_argument("--wheels-needed", metavar="FOLDER", help="only print the wheels of FOLDER to install here")
    args = ap.parse_args(argv)
    if args.wheels_needed:
        print(" ".join(wheels_needed(Path(args.wheels_needed))))
        return 0
    work = Path(args.dir or f"/tmp/orchestrate-acceptance{'-smoke' if args.cpu_smoke else ''}").absolute()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    steps = [("throughput", throughput), ("bf16 job, kill -9, resume", lifecycle), ("out of memory", out_of_memory),
             ("varlen", varlen)]
    for name, step in steps:
        t_step = time.time()
        try:
            step(work, args.cpu_smoke)
        except Exception as exc:  # noqa: BLE001 - one broken step is a FAIL row, the others still run
            row(name, False, "-", f"{type(exc).__name__}: {str(exc)[:300]}")
        print(f"[acceptance] step '{name}' took {time.time() - t_step:.0f} s", file=sys.stderr, flush=True)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"\nacceptance on {device}, torch {torch.__version__}, {time.time() - t0:.0f} s"
          f"{' (--cpu-smoke)' if args.cpu_smoke else ''}; work folder {work}")
    print("| check | verdict | figure | detail |\n|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(x.replace("|", "/") for x in r) + " |")
    (work / "acceptance.json").write_text(json.dumps([dict(zip(("check", "verdict", "figure", "detail"), r))
                                                      for r in ROWS], indent=1))
    return 1 if any(r[1] == "FAIL" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())

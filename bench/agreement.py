"""What the stop/save agreement costs per training step (issue 18.1).

The same job, run with the agreement on and off: the demo model (``orchestrate demo prepare``), 2 CPU
ranks (gloo), FSDP2, ``--steps`` steps, a log record every step and no checkpoint, through
``train_worker.py`` under torchrun exactly as the orchestrator launches it. "off" sets the bench-only
``ORCHESTRATE_BENCH_NO_AGREEMENT=1`` (no collective at all; a stop would then not be graceful). The
runs alternate (on, off, on, off, ...) so that a busy machine slows both alike.

Step time: rank 0's wall time per optimizer step (from the progress records' times), median over the
steps after ``--warmup``; per run, then the median over the runs. It also checks that both variants
trained the same steps with the same loss (bit for bit). ``--repo PATH`` adds a third variant, the
``train_worker.py`` of another checkout (e.g. the main branch before issue 18: two blocking
all-reduces with ``.item()`` per step, and the request file read every step).

    .venv/bin/python bench/agreement.py                      # ~3 min on 2 cores
    .venv/bin/python bench/agreement.py --repo /work/main    # + the checkout "before"

Prints a Markdown table and one ``RESULT {...}`` JSON line (also ``<dir>/result.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def prepare(root: Path) -> Path:
    from orchestrator.demo import prepare_demo

    return prepare_demo(root / "demo")


def run_once(repo: Path, demo: Path, root: Path, name: str, steps: int, env_extra: dict) -> list[dict]:
    """One torchrun of ``repo``'s worker; the rank-0 log records (one per step)."""
    run = root / name
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg.pop("launch", None)
    cfg.update(max_steps=steps, logging_steps=1, save_strategy="no", save_steps=10**9)
    run.mkdir(parents=True)
    (run / "worker.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATE_")}
    env.update({"ACCELERATE_USE_FSDP": "1", "FSDP_CPU_RAM_EFFICIENT_LOADING": "1", "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "ORCHESTRATE_RUN_DIR": str(run), "ORCHESTRATE_ATTEMPT_DIR": str(run / "attempt"),
                "PYTHONPATH": str(repo), **env_extra})
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(repo / "train_worker.py"),
            "--config", str(run / "worker.yaml"), "--model_id", str(demo / "model"), "--dataset_path",
            str(demo / "data"), "--output_dir", str(run / "output"), "--use_cpu", "true"]
    with open(run / "torchrun.log", "w") as log:
        code = subprocess.run(argv, cwd=run, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=1800).returncode
    if code != 0:
        raise SystemExit(f"{name}: torchrun exited {code}; see {run / 'torchrun.log'}")
    records = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "log"]


def step_time(logs: list[dict], warmup: int) -> float:
    """Median seconds per step after ``warmup`` steps (rank 0's clock at each step's log record)."""
    times = [r["time"] for r in logs if r["step"] >= warmup]
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each variant (alternating)")
    ap.add_argument("--repo", type=Path, help="another checkout whose worker is run as the variant 'before'")
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="orchestrate-bench-agreement-"))
    demo = prepare(root)
    variants = {"on": (REPO, {}), "off": (REPO, {"ORCHESTRATE_BENCH_NO_AGREEMENT": "1"})}
    if args.repo:
        variants["before"] = (args.repo.resolve(), {})
    times: dict[str, list[float]] = {v: [] for v in variants}
    losses: dict[str, list[float]] = {}
    t0 = time.time()
    for i in range(args.repeat):
        for name, (repo, env) in variants.items():
            logs = run_once(repo, demo, root, f"{name}-{i}", args.steps, env)
            assert [r["step"] for r in logs] == list(range(1, args.steps + 1)), f"{name}: steps missing"
            times[name].append(step_time(logs, args.warmup))
            losses.setdefault(name, [r["loss"] for r in logs])
            print(f"{name}-{i}: {times[name][-1] * 1000:.2f} ms/step", file=sys.stderr, flush=True)
    same_loss = all(losses[v] == losses["off"] for v in variants)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    print("| variant | ms per step (median of runs) | runs (ms) | vs off |")
    print("|---|---|---|---|")
    for v in variants:
        runs = ", ".join(f"{t * 1000:.2f}" for t in times[v])
        print(f"| {v} | {med[v] * 1000:.2f} | {runs} | {100 * (med[v] / med['off'] - 1):+.1f} % |")
    print(f"\nsame steps and the same loss at every step in every variant: {same_loss}")
    result = {"steps": args.steps, "warmup": args.warmup, "repeat": args.repeat, "ms_per_step": {
        v: round(m * 1000, 3) for v, m in med.items()}, "runs_ms": {v: [round(t * 1000, 3) for t in ts]
                                                                    for v, ts in times.items()},
        "overhead_on_vs_off": round(med["on"] / med["off"] - 1, 4), "same_loss": same_loss,
        "wall_s": round(time.time() - t0, 1)}
    print("RESULT " + json.dumps(result))
    (root / "result.json").write_text(json.dumps(result, indent=1))
    return 0 if same_loss else 1


if __name__ == "__main__":
    sys.exit(main())

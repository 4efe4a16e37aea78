"""Recovery benchmark: how fast a job gets back to training after a fault, and what it loses.

For faults (a)-(e) of the supervision issue, runs the demo model (2 CPU ranks, FSDP)
through `orchestrate submit --detach`, injects the fault, and measures from the
ledger and the progress file:

* recovery time: fault -> first training step of the next attempt;
* lost work: steps trained before the fault that had to be trained again.

    python bench/recovery.py [--out results.json] [--faults a,b,c,d,e]

Prints a Markdown table. It is a script, not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import goodput_report
import yaml

from orchestrator.backends.processes import rank_pids

REPO = Path(__file__).resolve().parents[1]
FAULTS = {
    "a": "kill -9 of one rank",
    "b": "kill -9 of the torchrun agent",
    "c": "SIGTERM to the job (preemption)",
    "d": "rank dies, newest checkpoint corrupt",
    "e": "one rank hangs (watchdog)",
}


def sh(home: Path, *args: str, env_extra: dict | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATE_")}
    env.update(ORCHESTRATE_HOME=str(home), **(env_extra or {}))
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, capture_output=True,
                         text=True, check=True)
    return out.stdout


def job(home: Path, job_id: str) -> dict:
    return json.loads(sh(home, "status", job_id, "--json"))


def records(run_dir: str) -> list[dict]:
    p = Path(run_dir) / "progress.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def wait(pred, timeout=600):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise TimeoutError


def rank_pid(job_id: str, rank: int) -> int | None:
    return rank_pids(job_id).get(rank)


def write_config(tmp: Path, assets: Path, fault: str) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg.update(model_id=str(assets / "model"), dataset_path=str(assets / "data"), max_steps=40, save_steps=5,
               logging_steps=1)
    cfg["launch"] = {"nproc_per_node": 2, "name": f"bench-{fault}",
                     "retry": {"backoff_s": 0.5 if fault != "d" else 3.0, "max_restarts": 5},
                     "watchdog": {"stall_floor_s": 10, "stall_factor": 5}}
    path = tmp / f"bench-{fault}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_fault(fault: str, tmp: Path, assets: Path) -> dict:
    home = tmp / f"home-{fault}"
    env_extra = {"ORCHESTRATE_FAULT": {"d": "exit:1:13", "e": "hang:1:13"}.get(fault, "")}
    job_id = sh(home, "submit", "--detach", str(write_config(tmp, assets, fault)), env_extra=env_extra).strip()
    run_dir = job(home, job_id)["run_dir"]
    if fault in "abc":
        wait(lambda: any(r["event"] == "log" and r["step"] >= 12 for r in records(run_dir)))
        t_fault = time.time()
        if fault == "a":
            os.kill(wait(lambda: rank_pid(job_id, 1), 30), signal.SIGKILL)
        else:
            os.kill(job(home, job_id)["attempts"][0]["pid"], signal.SIGKILL if fault == "b" else signal.SIGTERM)
    elif fault == "d":
        wait(lambda: (job(home, job_id)["attempts"] or [{}])[0].get("ended"))
        ckpt = Path(job(home, job_id)["output_dir"]) / "checkpoint-10" / "model.safetensors"
        with open(ckpt, "r+b") as f:
            f.truncate(ckpt.stat().st_size // 2)
    wait(lambda: job(home, job_id)["state"] in ("COMPLETED", "FAILED", "CANCELLED"))
    final = job(home, job_id)
    recs = records(run_dir)
    first = [r for r in recs if r["event"] == "log" and r["attempt"] == 1]
    if fault in "de":
        # The fault is the worker's own: it happens right after the last step attempt 1 logged.
        t_fault = max(r["time"] for r in first)
    second = [r for r in recs if r["event"] == "log" and r["attempt"] == 2]
    last_before = max(r["step"] for r in first)
    resumed = final["attempts"][1]["resumed_from"] if len(final["attempts"]) > 1 else None
    resumed_step = int(resumed.rsplit("-", 1)[1]) if resumed else 0
    return {"fault": fault, "what": FAULTS[fault], "state": final["state"],
            "failures": [a["failure"] for a in final["attempts"]],
            "recovery_s": round(second[0]["time"] - t_fault, 1) if second else None,
            "steps_redone": max(0, last_before - resumed_step), "resumed_from_step": resumed_step,
            "last_step_before_fault": last_before, "goodput": final.get("goodput")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", default="a,b,c,d,e")
    ap.add_argument("--out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="orchestrate-bench-") as d:
        tmp = Path(d)
        from orchestrator.demo import prepare_demo

        assets = prepare_demo(tmp / "assets")
        rows = [run_fault(f, tmp, assets) for f in args.faults.split(",")]
    print("| fault | failure classes | recovery (fault -> next step) | steps redone | resumed from |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| ({r['fault']}) {r['what']} | {' -> '.join(r['failures'])} | {r['recovery_s']} s | "
              f"{r['steps_redone']} (of {r['last_step_before_fault']}) | step {r['resumed_from_step']} |")
    print("\n" + goodput_report.fault_table(rows))   # issue 20: each fault's goodput and lost progress
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

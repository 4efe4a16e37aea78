"""Recovery benchmark: how fast a job gets back to training after a fault, what it loses, and where the time goes.

For faults (a)-(e) of the supervision issue, runs the demo model (2 CPU ranks, FSDP, 120 steps,
a checkpoint every 5) through `orchestrate submit --detach` with the default retry policy
(``--backoff S`` overrides ``launch.retry.backoff_s``), injects the fault, and measures from the
ledger, the agent's record and the progress file:

* recovery time: fault -> first training step of the next attempt;
* where it went: fault -> the supervisor saw the attempt end (``detect``) -> the next attempt
  started (``decide``: classification, clean-up, backoff) -> its rank 0 process started (``launch``:
  the torchrun agent, rendezvous, spawning the ranks) -> training began (``load``: imports, model,
  data, FSDP, checkpoint load) -> first step logged (``step``);
* lost work: steps trained before the fault that had to be trained again.

    python bench/recovery.py [--out results.json] [--faults a,b,c,d,e] [--repeat N] [--backoff S] [--spare-after S]

``--spare-after S`` sets ``ORCHESTRATE_SPARE_AFTER_S`` (default: unset, the product's 30 s, which the demo's
faults come before): the next attempt is started ahead as a spare once the current one has trained S seconds,
and faults (a)-(c) wait until its ranks are ready (a job that trained long enough to have one).

Prints a Markdown table (the median over ``--repeat`` runs, each run's figure beside it). It is a
script, not a test: numbers depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
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
PHASES = ("detect", "decide", "launch", "load", "step")


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


def wait(pred, timeout=900):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise TimeoutError


def write_config(tmp: Path, assets: Path, fault: str, backoff: float | None) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg.update(model_id=str(assets / "model"), dataset_path=str(assets / "data"), max_steps=120, save_steps=5,
               logging_steps=1)
    retry = {"max_restarts": 5} | ({"backoff_s": backoff} if backoff is not None else {})
    cfg["launch"] = {"nproc_per_node": 2, "name": f"bench-{fault}", "retry": retry,
                     "watchdog": {"stall_floor_s": 10, "stall_factor": 5}}
    path = tmp / f"bench-{fault}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def corrupt(checkpoint: Path) -> None:
    """Cut the biggest file of a complete checkpoint in half (what a torn write leaves)."""
    biggest = max((p for p in checkpoint.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)


def run_fault(fault: str, tmp: Path, assets: Path, backoff: float | None, spare_after: str | None) -> dict:
    home = tmp / f"home-{fault}-{time.time_ns()}"
    env_extra = {"ORCHESTRATE_FAULT": {"d": "exit:1:13", "e": "hang:1:13"}.get(fault, "")}
    if spare_after is not None:
        env_extra["ORCHESTRATE_SPARE_AFTER_S"] = spare_after
    job_id = sh(home, "submit", "--detach", str(write_config(tmp, assets, fault, backoff)), env_extra=env_extra).strip()
    info = job(home, job_id)
    run_dir = info["run_dir"]
    if fault in "abc":
        wait(lambda: any(r["event"] == "log" and r["step"] >= 12 for r in records(run_dir)))
        if spare_after is not None:   # the spare's ranks have done their imports (or never will)
            ready = Path(run_dir) / "attempts" / "2"
            wait(lambda: len(list(ready.glob("spare-ready-rank*"))) == 2 or job(home, job_id)["state"] != "RUNNING",
                 300)
        t_fault = time.time()
        if fault == "a":
            os.kill(wait(lambda: rank_pids(job_id).get(1), 30), signal.SIGKILL)
        else:
            os.kill(job(home, job_id)["attempts"][0]["pid"], signal.SIGKILL if fault == "b" else signal.SIGTERM)
    elif fault == "d":
        # Corrupt the newest complete checkpoint while attempt 1 still trains (before its rank dies at step 13).
        marker = Path(info["output_dir"]) / "checkpoint-10" / ".orchestrate-complete"
        wait(lambda: marker.is_file())
        corrupt(marker.parent)
    wait(lambda: job(home, job_id)["state"] in ("COMPLETED", "FAILED", "CANCELLED"))
    final = job(home, job_id)
    recs = records(run_dir)
    first = [r for r in recs if r["event"] == "log" and r["attempt"] == 1]
    if fault in "de":
        # The fault is the worker's own: it happens right after the last step attempt 1 logged.
        t_fault = max(r["time"] for r in first)
    last_before = max(r["step"] for r in first)
    resumed = final["attempts"][1]["resumed_from"] if len(final["attempts"]) > 1 else None
    resumed_step = int(resumed.rsplit("-", 1)[1]) if resumed else 0
    row = {"fault": fault, "what": FAULTS[fault], "state": final["state"],
           "failures": [a["failure"] for a in final["attempts"]],
           "steps_redone": max(0, last_before - resumed_step), "resumed_from_step": resumed_step,
           "last_step_before_fault": last_before, "goodput": final.get("goodput")}
    row.update(breakdown(t_fault, final, recs))
    row["spare"] = (Path(run_dir) / "attempts" / "2" / "spare.json").is_file()
    return row


def breakdown(t_fault: float, final: dict, recs: list[dict]) -> dict:
    """Recovery time and its phases (see the module doc); None where attempt 2 never trained."""
    second = [r for r in recs if r["event"] == "log" and r["attempt"] == 2]
    if len(final["attempts"]) < 2 or not second:
        return {"recovery_s": None}
    a1, a2 = final["attempts"][0], final["attempts"][1]
    begin = next((r["time"] for r in recs if r["event"] == "start" and r["attempt"] == 2), None)
    # "wall" of a log record: seconds since that rank's process started.
    proc_start = second[0]["time"] - second[0]["wall"] if second[0].get("wall") is not None else None
    marks = [t_fault, a1.get("ended"), a2.get("started"), proc_start, begin, second[0]["time"]]
    out = {"recovery_s": round(second[0]["time"] - t_fault, 2)}
    for name, (t0, t1) in zip(PHASES, zip(marks, marks[1:])):
        out[f"{name}_s"] = round(t1 - t0, 2) if t0 is not None and t1 is not None else None
    return out


def median_row(runs: list[dict]) -> dict:
    row = dict(runs[len(runs) // 2])
    for key in ("recovery_s", *(f"{p}_s" for p in PHASES)):
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = round(statistics.median(values), 2) if values else None
    row["runs"] = [r.get("recovery_s") for r in runs]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", default="a,b,c,d,e")
    ap.add_argument("--repeat", type=int, default=1, help="runs per fault (the table shows the median)")
    ap.add_argument("--backoff", type=float, help="launch.retry.backoff_s (default: the default policy's)")
    ap.add_argument("--spare-after", help="ORCHESTRATE_SPARE_AFTER_S for the jobs (default: unset)")
    ap.add_argument("--out")
    ap.add_argument("--keep", help="work in this folder and keep it (run directories, rank logs)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="orchestrate-bench-") as d:
        tmp = Path(args.keep or d)
        from orchestrator.demo import prepare_demo

        assets = prepare_demo(tmp / "assets")
        rows = [median_row([run_fault(f, tmp, assets, args.backoff, args.spare_after) for _ in range(args.repeat)])
                for f in args.faults.split(",")]
    print(f"load average before the last run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| fault | failure classes | recovery (fault -> next step) | " + " | ".join(PHASES)
          + " | steps redone | resumed from | spare | runs |")
    print("|---|---|---|" + "---|" * len(PHASES) + "---|---|---|---|")
    for r in rows:
        phases = " | ".join("-" if r.get(f"{p}_s") is None else f"{r[f'{p}_s']}" for p in PHASES)
        print(f"| ({r['fault']}) {r['what']} | {' -> '.join(r['failures'])} | {r['recovery_s']} s | {phases} | "
              f"{r['steps_redone']} (of {r['last_step_before_fault']}) | step {r['resumed_from_step']} | "
              f"{'yes' if r.get('spare') else 'no'} | {', '.join(str(x) for x in r['runs'])} |")
    print("\n" + goodput_report.fault_table(rows))   # issue 20: each fault's goodput and lost progress
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

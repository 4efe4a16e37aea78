"""Dashboard speed figures (issue 5), measured, not asserted. Run from the repo root:

    .venv/bin/python bench/dashboard.py [--jobs 1000] [--follow-s 20]

1. ``orchestrate --help`` and ``orchestrate status`` import neither torch nor transformers
   (``python -X importtime``).
2. ``orchestrate status --once`` with 1,000 jobs in the ledger (a few with 100,000-record
   progress files): wall time of the whole command, median of 5 runs.
3. CPU time of a live ``orchestrate status`` (in a pseudo-terminal) following a running
   job over ``--follow-s`` seconds, as a percentage of one core; likewise ``status JOB``
   and ``logs -f``. The running job is simulated by a writer that appends a progress
   record and a log line every 0.5 s and updates the ledger like the supervisor does.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.states import JobState  # noqa: E402
from orchestrator.store import jobfiles  # noqa: E402
from orchestrator.store.ledger import Ledger  # noqa: E402
from orchestrator.store.records import AttemptRecord, Job  # noqa: E402

STATES = ["COMPLETED"] * 85 + ["FAILED"] * 8 + ["CANCELLED"] * 5 + ["RUNNING"] * 2


def _plan(job_id: str, run_dir: Path, max_steps: int) -> dict:
    return {"job_id": job_id, "name": "bench", "backend": "local", "nproc_per_node": 2, "run_dir": str(run_dir),
            "retry": {"max_restarts": 3, "max_preemptions": 20, "max_no_progress": 2, "backoff_s": 5.0,
                      "backoff_max_s": 300.0, "restart_from_scratch": False},
            "worker_config": {"max_steps": max_steps, "logging_steps": 1, "learning_rate": 3e-5}}


def _progress_lines(records: int, attempt: int, t0: float, max_steps: int, start: int = 0) -> list[str]:
    lines = [json.dumps({"event": "start", "attempt": attempt, "step": start, "time": t0, "max_steps": max_steps,
                         "distributed_type": "FSDP", "fsdp_version": 2, "world_size": 16}, sort_keys=True)]
    for k in range(records):
        step = start + k + 1
        lines.append(json.dumps({"event": "log", "attempt": attempt, "step": step, "time": t0 + step,
                                 "loss": 2.0 / (1 + step / 500) + random.random() * 0.05, "grad_norm": 0.7,
                                 "learning_rate": 3e-5, "max_steps": max_steps, "tokens": step * 4096,
                                 "tokens_per_s": 4096.0 + random.random() * 100, "epoch": step / 1000,
                                 "wall": float(step)}, sort_keys=True))
        if step % 500 == 0:
            lines.append(json.dumps({"event": "checkpoint", "attempt": attempt, "step": step, "time": t0 + step,
                                     "path": f"/out/checkpoint-{step}"}, sort_keys=True))
    return lines


def make_home(root: Path, n_jobs: int, big_jobs: int = 5, big_records: int = 100_000, running: int = 0) -> Path:
    """An ``ORCHESTRATE_HOME`` with ``n_jobs`` jobs, their plans, progress files and error records."""
    random.seed(5)
    now = time.time()
    for i in range(n_jobs):
        job_id = f"bench-{i:04d}-{i * 7919 % 0xffffff:06x}"
        run_dir = root / "runs" / job_id
        (run_dir / "attempts" / "1").mkdir(parents=True)
        state = "RUNNING" if i < running else STATES[i % len(STATES)]
        records = big_records if i < big_jobs else random.randint(20, 400)
        max_steps = records + (50 if state != "COMPLETED" else 0)
        (run_dir / "plan.json").write_text(json.dumps(_plan(job_id, run_dir, max_steps)))
        created = now - 3600 - i * 60
        lines = _progress_lines(records, 1, created, max_steps)
        (run_dir / "progress.jsonl").write_text("\n".join(lines) + "\n")
        if state == "FAILED":
            (run_dir / "attempts" / "1" / "error-rank3.json").write_text(json.dumps(
                {"rank": 3, "type": "RuntimeError", "message": "boom", "phase": "train", "step": records,
                 "time": created + records, "traceback": "Traceback (most recent call last):\nRuntimeError: boom\n"}))
        running = state == "RUNNING"
        attempt = AttemptRecord(job_id, 1, created + 1, None if running else created + records + 5,
                                exit_code=None if running else (0 if state == "COMPLETED" else 1),
                                failure=None if running else {"FAILED": "CRASHED"}.get(state, state), start_step=0,
                                end_step=None if running else records, gained_checkpoint=None if running else 1,
                                status="RUNNING" if running else "ENDED")
        jobfiles.create_job(Job(job_id, "bench", "local", JobState(state), created, created + records + 5,
                                str(run_dir), "/c.yaml", str(run_dir / "output"), records, max_steps, "FSDP",
                                message=None if running else f"job {state}"))
        jobfiles.write_attempt(run_dir, attempt)
    return root


PYCACHE: str | None = None   # set in main(): bytecode cached like in any installation


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATE_")}
    env["ORCHESTRATE_HOME"] = str(home)
    if PYCACHE:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = PYCACHE
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def import_check(home: Path) -> None:
    """Which heavy packages ``--help`` and ``status --once`` import (none expected)."""
    for args in (["--help"], ["status", "--once"]):
        p = subprocess.run([sys.executable, "-X", "importtime", "-m", "orchestrator.cli", *args], env=_env(home),
                           cwd=REPO, capture_output=True, text=True)
        rows = [line.split("|") for line in p.stderr.splitlines()
                if line.startswith("import time:") and line.split("|")[1].strip().isdigit()]
        mods = [r[-1].strip() for r in rows]
        cumulative = {r[-1].strip(): int(r[1]) / 1e6 for r in rows if not r[-1].startswith("  ")}  # top level
        heavy = sorted({m for m in mods if m.split(".")[0] in ("torch", "transformers", "trl", "accelerate",
                                                               "datasets", "matplotlib")})
        eager = sum(cumulative.get(m, 0.0) for m in ("orchestrator.config", "orchestrator.jobs"))
        print(f"  orchestrate {' '.join(args):14s} rc={p.returncode}  modules imported: {len(mods):4d}  "
              f"heavy: {heavy or 'none'}  (orchestrator.config + .jobs, imported by main(): {eager:.3f} s)")


def time_once(home: Path, runs: int = 5, *args: str) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + sys) seconds of ``runs`` runs of ``orchestrate status --once`` into a pipe.

    CPU time is the steadier figure on a shared machine: it does not count waiting for a core.
    """
    import resource

    walls, cpus = [], []
    for _ in range(runs):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        p = subprocess.run(_cli("status", "--once", *args), env=_env(home), cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        walls.append(time.perf_counter() - t)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        assert p.returncode == 0, p.stderr.decode()
    return walls, cpus


class FakeRunningJob(threading.Thread):
    """Appends a progress record and a rank-log line every ``period`` s; updates the ledger like a supervisor."""

    def __init__(self, home: Path, job_id: str, period: float = 0.5):
        super().__init__(daemon=True)
        self.home, self.job_id, self.period = home, job_id, period
        self.stop = threading.Event()
        self.run_dir = home / "runs" / job_id
        self.log = self.run_dir / "attempts" / "1" / "ranks" / "run-x" / "attempt_0" / "0" / "stdout.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)

    def run(self) -> None:
        """Write until ``stop`` is set."""
        ledger = Ledger.for_home(self.home)
        step = ledger.get(self.job_id).step
        while not self.stop.wait(self.period):
            step += 1
            rec = json.dumps({"event": "log", "attempt": 1, "step": step, "time": time.time(), "loss": 1.0 / step,
                              "tokens_per_s": 4000.0, "max_steps": 10**6}, sort_keys=True)
            with open(self.run_dir / "progress.jsonl", "a") as f:
                f.write(rec + "\n")
            with open(self.log, "a") as f:
                f.write(f"step {step} loss {1.0 / step:.4f}\n")
            ledger.update_job(self.job_id, step=step, heartbeat=time.time())


def _drain(fd: int, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            if not os.read(fd, 65536):
                return
        except OSError:
            return


def cpu_of_live(home: Path, args: list[str], seconds: float, warmup: float = 3.0) -> float:
    """CPU seconds per wall second (x100 = % of one core) of a live command in a 50x200 pty."""
    import psutil

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(_cli(*args), env={**_env(home), "TERM": "xterm-256color"}, cwd=REPO,
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    stop = threading.Event()
    threading.Thread(target=_drain, args=(master, stop), daemon=True).start()
    try:
        ps = psutil.Process(proc.pid)
        time.sleep(warmup)
        c0, t0 = sum(ps.cpu_times()[:2]), time.monotonic()
        time.sleep(seconds)
        c1, t1 = sum(ps.cpu_times()[:2]), time.monotonic()
        assert proc.poll() is None, f"{args} ended early with {proc.returncode}"
    finally:
        proc.terminate()
        proc.wait(10)
        stop.set()
        os.close(master)
    return (c1 - c0) / (t1 - t0)


def main() -> None:
    """Build the ledgers, measure, print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--follow-s", type=float, default=20.0)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (other work skews wall times)")
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        big = make_home(Path(tmp) / "big", args.jobs)
        size = sum(p.stat().st_size for p in (big / "runs").glob("*/progress.jsonl"))
        print(f"ledger: {args.jobs} jobs, progress files {size / 1e6:.0f} MB in all (5 of 100,000 records)")
        print("1. imports")
        import_check(big)
        print(f"2. status --once with {args.jobs} jobs (whole command, 5 runs each)")
        global PYCACHE
        (big / "cache" / "dashboard.json").unlink(missing_ok=True)
        wall, cpu = time_once(big, 1)
        print(f"  first run (no summary cache yet; reads every progress tail): wall {wall[0]:.3f} s, "
              f"CPU {cpu[0]:.3f} s")
        for label, cache in (("no bytecode cache (PYTHONDONTWRITEBYTECODE=1)", None),
                             ("bytecode cached (normal install)", str(Path(tmp) / "pycache"))):
            PYCACHE = cache
            time_once(big, 1)   # warm the bytecode cache
            for extra in ([], ["--json"]):
                wall, cpu = time_once(big, 5, *extra)
                print(f"  status --once {' '.join(extra):6s} {label}: wall median {statistics.median(wall):.3f} s "
                      f"(min {min(wall):.3f}, max {max(wall):.3f}); CPU median {statistics.median(cpu):.3f} s")
        t = time.perf_counter()
        subprocess.run(_cli("--help"), env=_env(big), cwd=REPO, capture_output=True)
        print(f"  (for scale: orchestrate --help takes {time.perf_counter() - t:.3f} s)")
        small = make_home(Path(tmp) / "small", 4, big_jobs=0, running=1)
        running = [j.id for j in Ledger.for_home(small).jobs() if j.state.value == "RUNNING"]
        print(f"3. CPU of following a running job ({args.follow_s:.0f} s each, pseudo-terminal 200x50, 1 frame/s)")
        writer = FakeRunningJob(small, running[0])
        writer.start()
        try:
            for label, home, cmd in (("status (4 jobs)", small, ["status"]),
                                     ("status JOB", small, ["status", running[0]]),
                                     ("logs JOB -f", small, ["logs", running[0], "-f"]),
                                     (f"status ({args.jobs} jobs)", big, ["status"])):
                share = cpu_of_live(home, cmd, args.follow_s)
                print(f"  {label:22s}: {100 * share:.2f} % of one core")
        finally:
            writer.stop.set()


if __name__ == "__main__":
    main()

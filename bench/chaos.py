"""Chaos campaign: seeded random faults against real jobs, with the invariants checked after each.

Each scenario runs the CPU demo (2 ranks, FSDP, real torchrun) through the real CLI and
injects one fault at a random moment: a kill -9 of a rank (while training, or at a random
point of a save), of the torchrun agent or of the supervisor; SIGTERM to the job; SIGHUP of
a foreground submit (its terminal closed); two `orchestrate resume` at once; `cancel`
racing a restart; a full disk (the output folder on a small tmpfs). It then acts as a user
would (a dead supervisor is resumed; a full disk gets more space, then resume) and checks:

1. a job not cancelled ends COMPLETED, with final weights bit-identical to an uninterrupted
   run (a full disk: FAILED as DISK_FULL first, every complete checkpoint still there);
2. a cancelled job ends CANCELLED and stays so;
3. never two attempts of one job alive at once (processes sampled every 50 ms throughout);
4. no process of the job is left;
5. the ledger's attempts add up (numbered 1..n, all ended with a failure class, each resumed
   attempt starting at the step of the checkpoint it resumed from, the last one matching the
   job's state).

    python bench/chaos.py --n 50 --seed 1 [--kinds kill_rank_save,cancel_race] [--json out.json]

A failing scenario prints its seed and kind: `--replay SEED:KIND` runs it again. Needs root for the
tmpfs of the full-disk scenario (skipped with a note otherwise).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import goodput_report
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.backends.processes import attempt_root, job_processes, rank_pids  # noqa: E402
from orchestrator.worker import channel  # noqa: E402
from orchestrator.worker.checkpoints import list_checkpoints, verify_checkpoint  # noqa: E402

KINDS = ("kill_rank_train", "kill_rank_save", "kill_agent", "kill_supervisor", "sigterm", "sighup", "double_resume",
         "cancel_race", "disk_full")
MAX_STEPS = 24
TRAINING = dict(max_steps=MAX_STEPS, save_steps=4, logging_steps=1, save_total_limit=2)
LAUNCH = {"nproc_per_node": 2, "retry": {"backoff_s": 0.5, "max_restarts": 10, "max_no_progress": 4},
          "watchdog": {"stall_floor_s": 60, "startup_timeout_s": 600}}
SAVE_POINTS = ("start", "model", "optimizer", "rng", "write", "marker", "rotate")
DISK_MB = 6            # two demo checkpoints (2.3 MB each) fit, the third does not


@dataclass
class Result:
    seed: int
    kind: str
    state: str = ""
    attempts: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""
    goodput: dict | None = None      # status --json "goodput" at the end (issue 20)

    @property
    def survived(self) -> int:
        """Failures the job got through (attempts that did not complete, the cancelled one aside)."""
        return sum(1 for a in self.attempts if a not in ("COMPLETED", "CANCELLED"))


# ---- running the CLI -------------------------------------------------------------------------

def env_for(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATE_")}
    env.update(ORCHESTRATE_HOME=str(home), PYTHONPATH=str(REPO), **extra)
    return env


def cli(home: Path, *args: str, timeout: float = 900, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env_for(home, **extra),
                          capture_output=True, text=True, timeout=timeout, cwd=str(home.parent))


def status(home: Path, job_id: str) -> dict:
    r = cli(home, "status", job_id, "--json", timeout=120)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def wait_for(pred, timeout: float, interval: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    return None


def logged_step(run_dir: str) -> int:
    path = Path(run_dir) / channel.PROGRESS_FILE
    steps = [r.get("step", 0) for r in channel.read_progress(path) if r.get("event") == "log"]
    return max(steps, default=0)


def write_config(workdir: Path, assets: Path, **overrides) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg.update(model_id=str(assets / "model"), dataset_path=str(assets / "data"), **TRAINING)
    cfg.update(overrides)
    cfg["launch"] = {**(cfg.get("launch") or {}), **LAUNCH}
    path = workdir / "job.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def final_weights(output_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(output_dir) / "model.safetensors"))


# ---- the invariants --------------------------------------------------------------------------

class AttemptSampler:
    """Every 50 ms: which attempts of the job have live processes (invariant 3)."""

    def __init__(self, job_id: str):
        self.job_id, self.overlaps, self.samples = job_id, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            seen = set()
            for p in job_processes(self.job_id):
                try:
                    if p.status() != psutil.STATUS_ZOMBIE:
                        seen.add(p.environ().get(channel.ENV_ATTEMPT))
                except psutil.Error:
                    continue
            self.samples += 1
            if len(seen) > 1:
                self.overlaps.append(sorted(seen))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def check_ledger(job: dict) -> list[str]:
    """Invariant 5: the attempts add up."""
    bad, atts = [], job.get("attempts") or []
    if [a["n"] for a in atts] != list(range(1, len(atts) + 1)):
        bad.append(f"attempt numbers {[a['n'] for a in atts]}")
    for a in atts:
        if a.get("ended") is None or not a.get("failure") or a.get("status") not in ("ENDED", None):
            bad.append(f"attempt {a['n']} not ended properly ({a.get('status')}, {a.get('failure')})")
        resumed = a.get("resumed_from") or ""
        if resumed and resumed.rsplit("-", 1)[-1].isdigit() and int(resumed.rsplit("-", 1)[-1]) != a.get("start_step"):
            bad.append(f"attempt {a['n']} resumed from {Path(resumed).name} but starts at step {a.get('start_step')}")
    last = atts[-1]["failure"] if atts else None
    expected = {"COMPLETED": "COMPLETED", "CANCELLED": "CANCELLED"}.get(job.get("state"))
    # A cancel that lands while the supervisor waits to retry a failed attempt ends the job with no new
    # attempt: the last one rightly keeps its own failure, and the job's message says when the cancel came.
    between = job.get("state") == "CANCELLED" and "before the attempt started" in (job.get("message") or "")
    if expected and last != expected and not between:
        bad.append(f"job {job.get('state')} but its last attempt ended {last}")
    return bad


def check_end(job_id: str, job: dict, reference: dict | None, expect: str) -> list[str]:
    """Invariants 1, 2, 4, 5 once the job has ended."""
    bad = []
    if job.get("state") != expect:
        bad.append(f"ended {job.get('state')} ({job.get('message')}), expected {expect}")
    if expect == "COMPLETED" and job.get("state") == "COMPLETED" and reference is not None:
        got = final_weights(job["output_dir"])
        import torch

        diff = [k for k in reference if k not in got or not torch.equal(reference[k], got[k])]
        if diff or set(got) != set(reference):
            bad.append(f"final weights differ from the uninterrupted run ({len(diff)} tensors)")
    left = [p.pid for p in job_processes(job_id)]
    if left:
        bad.append(f"processes left: {left}")
    return bad + check_ledger(job)


# ---- the scenarios ---------------------------------------------------------------------------

class Scenario:
    """One seeded fault against one job (its own ORCHESTRATE_HOME under ``root``)."""

    def __init__(self, root: Path, assets: Path, seed: int, kind: str, reference: dict | None):
        self.rng = random.Random(seed)
        self.seed, self.kind, self.reference = seed, kind, reference
        self.dir = root / f"s{seed:04d}-{kind}"
        self.dir.mkdir(parents=True)
        self.home = self.dir / "home"
        self.assets = assets
        self.result = Result(seed, kind)
        self.job_id = ""
        self.mount: Path | None = None

    def run(self) -> Result:
        t0 = time.monotonic()
        sampler = None
        try:
            expect, cfg, env = self.prepare()
            sampler = self.start(cfg, env)
            getattr(self, self.kind)()
            job = self.finish(expect)
            self.result.violations += check_end(self.job_id, job, self.reference, expect)
        except Exception as exc:  # noqa: BLE001 - a broken scenario is a violation, with its seed
            self.result.violations.append(f"scenario error: {type(exc).__name__}: {exc}")
        finally:
            if sampler is not None:
                sampler.stop()
                self.result.violations += [f"two attempts alive at once: {o}" for o in sampler.overlaps[:3]]
            self.cleanup()
        self.result.seconds = round(time.monotonic() - t0, 1)
        return self.result

    def prepare(self) -> tuple[str, Path, dict]:
        overrides, env = {}, {}
        if self.kind == "kill_rank_save":
            point = self.rng.choice(SAVE_POINTS)
            # rotation deletes something only once save_total_limit (2) checkpoints exist
            step = self.rng.choice([12, 16] if point == "rotate" else [4, 8, 12, 16])
            rank = 0 if point in ("marker", "rotate") else self.rng.choice([0, 1])
            env["ORCHESTRATE_SAVE_FAULT"] = f"kill:{rank}:{step}:{point}"
            self.result.note = f"kill rank {rank} at '{point}' of the save of checkpoint-{step}"
        if self.kind == "disk_full":
            self.mount = self.dir / "out"
            self.mount.mkdir()
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(self.mount)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                self.mount = None
                raise RuntimeError(f"cannot mount a tmpfs for the full disk (needs root): {r.stderr.strip()}")
            overrides.update(output_dir=str(self.mount), save_total_limit=None)
        expect = "CANCELLED" if self.kind == "cancel_race" else "COMPLETED"
        return expect, write_config(self.dir, self.assets, **overrides), env

    def start(self, cfg: Path, env: dict) -> AttemptSampler:
        if self.kind == "sighup":
            self.tmux = f"chaos-{os.getpid()}-{self.seed}"
            argv = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "orchestrator.cli", "submit", str(cfg)))
            exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env_for(self.home, TERM="xterm").items()
                               if k.startswith(("ORCHESTRATE_", "PATH", "HOME", "PYTHON", "TERM")))
            subprocess.run(["tmux", "-L", self.tmux, "-f", "/dev/null", "new-session", "-d", "-x", "150", "-y", "50",
                            f"cd {shlex.quote(str(self.dir))} && env {exports} {argv}"], check=True)
            self.job_id = wait_for(self._only_job, 120, 0.2) or ""
        else:
            r = cli(self.home, "submit", "--detach", str(cfg), timeout=300, **env)
            if r.returncode != 0:
                raise RuntimeError(f"submit failed: {r.stderr.strip()[-500:]}")
            self.job_id = r.stdout.strip()
        if not self.job_id:
            raise RuntimeError("no job id")
        self.run_dir = status(self.home, self.job_id)["run_dir"]
        return AttemptSampler(self.job_id)

    def _only_job(self) -> str | None:
        r = cli(self.home, "list", "--json", timeout=60)
        jobs = json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else []
        return jobs[0]["id"] if jobs else None

    def _at_step(self, low: int = 2, high: int = MAX_STEPS - 4) -> int:
        step = self.rng.randint(low, high)
        if not wait_for(lambda: logged_step(self.run_dir) >= step, 600, 0.05):
            raise RuntimeError(f"step {step} never came")
        return step

    def _kill_supervisor(self) -> None:
        pid = (status(self.home, self.job_id).get("supervisor") or {}).get("pid")
        if not pid:
            raise RuntimeError("no supervisor pid in status")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10)

    # each kind: the fault, then what a user would do
    def kill_rank_train(self) -> None:
        step = self._at_step()
        rank = self.rng.choice([0, 1])
        pid = rank_pids(self.job_id).get(rank)
        if pid:
            os.kill(pid, signal.SIGKILL)
        self.result.note = f"kill -9 rank {rank} at step {step}"

    def kill_rank_save(self) -> None:
        pass  # the worker kills itself at the save point chosen in prepare()

    def kill_agent(self) -> None:
        step = self._at_step()
        attempt = len(status(self.home, self.job_id).get("attempts") or [])
        root = attempt_root(self.job_id, attempt)
        if root:
            os.kill(root.pid, signal.SIGKILL)
        self.result.note = f"kill -9 the torchrun agent at step {step}"

    def sigterm(self) -> None:
        step = self._at_step()
        for pid in rank_pids(self.job_id).values():   # what a scheduler's preemption does to every rank
            os.kill(pid, signal.SIGTERM)
        self.result.note = f"SIGTERM to every rank at step {step}"

    def kill_supervisor(self) -> None:
        step = self._at_step()
        self._kill_supervisor()
        time.sleep(self.rng.uniform(0, 3))             # the user notices a little later
        r = cli(self.home, "resume", "--detach", self.job_id, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"resume failed: {r.stderr.strip()}")
        self.result.note = f"kill -9 the supervisor at step {step}, then resume"

    def sighup(self) -> None:
        step = self._at_step()
        subprocess.run(["tmux", "-L", self.tmux, "kill-server"], capture_output=True)
        self.result.note = f"terminal of the foreground submit closed at step {step}"

    def double_resume(self) -> None:
        step = self._at_step()
        self._kill_supervisor()
        outs: list[subprocess.CompletedProcess] = []
        threads = [threading.Thread(target=lambda: outs.append(cli(self.home, "resume", "--detach", self.job_id,
                                                                   timeout=300))) for _ in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        told = sum("already supervised" in o.stdout for o in outs)
        if [o.returncode for o in outs] != [0, 0] or told != 1:
            self.result.violations.append(f"two resumes: exit {[o.returncode for o in outs]}, "
                                          f"{told} said 'already supervised'")
        self.result.note = f"kill -9 the supervisor at step {step}, then two resumes at once"

    def cancel_race(self) -> None:
        step = self._at_step()
        pid = rank_pids(self.job_id).get(1)
        if pid:
            os.kill(pid, signal.SIGKILL)
        delay = self.rng.uniform(0, 2.5)               # somewhere between the attempt's end and the restart
        time.sleep(delay)
        r = cli(self.home, "cancel", self.job_id, timeout=300)
        if r.returncode != 0:
            self.result.violations.append(f"cancel exited {r.returncode}: {r.stderr.strip()[-300:]}")
        self.result.note = f"kill -9 rank 1 at step {step}, cancel {delay:.1f} s later"

    def disk_full(self) -> None:
        job = self._wait_end()
        complete = [p for s, p in list_checkpoints(self.mount) if verify_checkpoint(p, s).ok]
        if job.get("state") != "FAILED" or (job.get("attempts") or [{}])[-1].get("failure") != "DISK_FULL":
            self.result.violations.append(f"full disk ended {job.get('state')} "
                                          f"{[a['failure'] for a in job.get('attempts', [])]}, expected DISK_FULL")
        if not complete:
            self.result.violations.append("full disk: no complete checkpoint left")
        subprocess.run(["mount", "-o", "remount,size=256m", str(self.mount)], check=True)   # space is back
        r = cli(self.home, "resume", "--detach", self.job_id, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"resume after freeing space failed: {r.stderr.strip()}")
        self.result.note = f"output on a {DISK_MB} MB tmpfs; {len(complete)} complete checkpoint(s) kept; resumed"

    def _wait_end(self, timeout: float = 900) -> dict:
        def ended():
            job = status(self.home, self.job_id)
            if job.get("state") in ("COMPLETED", "FAILED", "CANCELLED"):
                sup = job.get("supervisor") or {}
                return job if not sup.get("alive") else None   # its supervisor has let go
            return None
        job = wait_for(ended, timeout, 0.5)
        if job is None:
            raise RuntimeError(f"job did not end within {timeout:.0f} s")
        return job

    def finish(self, expect: str) -> dict:
        job = self._wait_end()
        if expect == "CANCELLED":
            time.sleep(3)                              # and it stays so
            again = status(self.home, self.job_id)
            if again.get("state") != "CANCELLED":
                self.result.violations.append(f"cancelled job turned {again.get('state')}")
        self.result.state = job.get("state", "")
        self.result.attempts = [a["failure"] for a in job.get("attempts", [])]
        self.result.goodput = job.get("goodput")
        return job

    def cleanup(self) -> None:
        if self.kind == "sighup":
            subprocess.run(["tmux", "-L", getattr(self, "tmux", "none"), "kill-server"], capture_output=True)
        if self.job_id and job_processes(self.job_id):
            cli(self.home, "cancel", self.job_id, timeout=300)
        if self.mount is not None:
            subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)


def reference_run(root: Path, assets: Path) -> dict:
    """The uninterrupted run every completed scenario must equal, bit for bit."""
    d = root / "reference"
    d.mkdir()
    cfg = write_config(d, assets)
    r = cli(d / "home", "submit", str(cfg), timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"the reference run failed: {r.stderr[-1000:]}")
    jobs = json.loads(cli(d / "home", "list", "--json").stdout)
    return final_weights(jobs[0]["output_dir"])


def campaign(n: int, seed: int, kinds: tuple[str, ...] = KINDS, root: Path | None = None,
             assets: Path | None = None, say=print) -> list[Result]:
    """Run ``n`` scenarios (kinds drawn with ``seed``); return their results."""
    own_root = root is None
    root = Path(root or tempfile.mkdtemp(prefix="orchestrate-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    if assets is None:
        from orchestrator.demo import prepare_demo

        assets = prepare_demo(root / "assets")
    reference = reference_run(root, assets)
    rng = random.Random(seed)
    results = []
    for i in range(n):
        scenario_seed = seed * 1000 + i
        kind = kinds[i % len(kinds)] if n >= len(kinds) and i < len(kinds) else rng.choice(kinds)
        res = Scenario(root, assets, scenario_seed, kind, reference).run()
        results.append(res)
        say(f"{i + 1:3d}/{n} seed {res.seed:6d} {res.kind:16s} {res.state or '-':10s} {res.seconds:6.1f} s  "
            f"attempts {','.join(res.attempts) or '-'}  {res.note}" + (f"  VIOLATIONS: {res.violations}"
                                                                          if res.violations else ""))
    if own_root and not any(r.violations for r in results):
        shutil.rmtree(root, ignore_errors=True)   # kept when something failed: the evidence
    return results


def replay(scenarios: list[tuple[int, str]]) -> list[Result]:
    """Run the given ``(scenario seed, kind)`` pairs again, e.g. the failing ones of a campaign."""
    from orchestrator.demo import prepare_demo

    root = Path(tempfile.mkdtemp(prefix="orchestrate-chaos-"))
    assets = prepare_demo(root / "assets")
    reference = reference_run(root, assets)
    results = [Scenario(root, assets, seed, kind, reference).run() for seed, kind in scenarios]
    for res in results:
        print(f"seed {res.seed:6d} {res.kind:16s} {res.state or '-':10s} attempts {','.join(res.attempts)}  "
              f"{res.note}" + (f"  VIOLATIONS: {res.violations}" if res.violations else ""))
    return results


def summary(results: list[Result]) -> dict:
    return {"scenarios": len(results), "failures_survived": sum(r.survived for r in results),
            "violations": sum(len(r.violations) for r in results),
            "by_kind": {k: sum(1 for r in results if r.kind == k) for k in KINDS if any(r.kind == k for r in results)},
            "failing_seeds": [r.seed for r in results if r.violations]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10, help="scenarios (default 10)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--json", help="write every result and the summary here")
    p.add_argument("--replay", action="append", metavar="SEED:KIND", help="run exactly this scenario (as printed "
                   "by a campaign; repeatable) instead of drawing --n")
    args = p.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        p.error(f"unknown kinds {sorted(unknown)}; valid: {KINDS}")
    t0 = time.monotonic()
    if args.replay:
        results = replay([(int(r.split(":")[0]), r.split(":")[1]) for r in args.replay])
    else:
        results = campaign(args.n, args.seed, kinds)
    s = {**summary(results), "seconds": round(time.monotonic() - t0),
         "goodput": goodput_report.distribution([r.goodput for r in results])}
    print(json.dumps(s, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": s, "results": [asdict(r) for r in results]}, indent=1))
    return 1 if s["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Chaos campaign: seeded random faults against real jobs, with the invariants checked after each.

Each scenario runs the CPU demo (2 ranks, FSDP, real torchrun) through the real CLI and
injects one fault at a random moment: a kill -9 of a rank (while training, or at a random
point of a save), of the torchrun agent or of the supervisor; SIGTERM to the job; SIGHUP of
a foreground submit (its terminal closed); two `orchestrate resume` at once; `cancel`
racing a restart; a full disk (the output folder on a small tmpfs); and (issue 17) SIGSTOP/SIGCONT
of the supervisor or of rank 0 past the lease; a second login node (its own host name and PID
namespace, `unshare`) running resume and cancel while the job's processes run, are frozen, or died
with their host; that second node with its clock tens of seconds off (libfaketime); EEXIST after a
successful link of a lease generation (a retransmitted NFS LINK); a kill during the write of a
checkpoint's completion marker (an LD_PRELOAD library kills rank 0 at the marker's rename). It
then acts as a user would (a dead supervisor is resumed; a full disk gets more space, then resume)
and checks:

1. a job not cancelled ends COMPLETED, with final weights bit-identical to an uninterrupted
   run (a full disk: FAILED as DISK_FULL first, every complete checkpoint still there);
2. a cancelled job ends CANCELLED and stays so, and is never CANCELLED while ranks of it still run
   (sampled every 50 ms; a paused rank does not run);
3. never two attempts of one job running at once (processes sampled every 50 ms throughout; a
   stopped process does not run, and a woken, fenced attempt gets one step's grace to stop), and never
   two attempts training at once: no attempt writes a training record after a later attempt did;
4. no process of the job is left;
5. the ledger's attempts add up (numbered 1..n, all ended with a failure class, each resumed
   attempt starting at the step of the checkpoint it resumed from, the last one matching the
   job's state).

    python bench/chaos.py --n 60 --seed 17 [--kinds second_host,pause_rank0] [--json out.json]

A failing scenario prints its seed and kind: `--replay SEED:KIND` runs it again. Needs root for the
tmpfs of the full-disk scenario and for `unshare`, libfaketime for the clock offset and a C compiler
for the marker kill (each skipped with a note otherwise).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import socket
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import chaos_hosts as hosts  # noqa: E402
from orchestrator.backends.processes import attempt_root, job_processes, rank_pids  # noqa: E402
from orchestrator.worker import channel  # noqa: E402
from orchestrator.worker.checkpoints import list_checkpoints, verify_checkpoint  # noqa: E402

KINDS = ("kill_rank_train", "kill_rank_save", "kill_agent", "kill_supervisor", "sigterm", "sighup", "double_resume",
         "cancel_race", "disk_full", "pause_supervisor", "pause_rank0", "clock_offset", "second_host_cancel",
         "second_host_crash", "second_host_freeze", "eexist_link", "kill_marker_write")
LEASE_S = 10.0         # every scenario's lease (ORCHESTRATE_LEASE_S): pauses and judgements past it stay short
RUN_GRACE_S = 10.0     # a woken, fenced attempt runs at most to its next step boundary
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
    env.update(ORCHESTRATE_HOME=str(home), PYTHONPATH=str(REPO), ORCHESTRATE_LEASE_S=f"{LEASE_S:g}", **extra)
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
    """Every 50 ms: which attempts of the job run (invariant 3) and whether it is CANCELLED meanwhile (2).

    Running means a live process of the attempt that is neither a zombie nor stopped (SIGSTOP: a paused
    rank does not train). Two attempts running at once for longer than RUN_GRACE_S is a violation (a
    woken, fenced attempt only finishes its step); so are ranks running when the job is first seen
    CANCELLED, or still running RUN_GRACE_S later.
    """

    def __init__(self, job_id: str):
        self.job_id, self.overlaps, self.samples = job_id, [], 0
        self.cancelled_running: list[str] = []
        self.run_dir: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _running(self) -> dict[str, list]:
        seen: dict[str, list] = {}
        for p in job_processes(self.job_id):
            try:
                if p.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
                    continue
                env = p.environ()
                seen.setdefault(env.get(channel.ENV_ATTEMPT), []).append(env.get("RANK"))
            except psutil.Error:
                continue
        return seen

    def _state(self) -> str | None:
        if not self.run_dir:
            return None
        return (channel.read_json(Path(self.run_dir) / "ledger" / "job.json") or {}).get("state")

    def _run(self) -> None:
        overlap_since = cancelled_at = None
        while not self._stop.wait(0.05):
            seen, now = self._running(), time.monotonic()
            self.samples += 1
            if len(seen) > 1:
                overlap_since = overlap_since or now
                if now - overlap_since > RUN_GRACE_S and not self.overlaps:
                    self.overlaps.append(sorted(str(a) for a in seen))
            else:
                overlap_since = None
            if self._state() == "CANCELLED":
                ranks = sorted(str(a) for a, rs in seen.items() if any(r is not None for r in rs))
                first = cancelled_at is None
                cancelled_at = cancelled_at or now
                if ranks and (first or now - cancelled_at > RUN_GRACE_S) and not self.cancelled_running:
                    self.cancelled_running.append(f"attempt(s) {ranks} still running "
                                                  f"{now - cancelled_at:.1f} s after the job was CANCELLED")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _zombie(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def check_training_records(run_dir: str) -> list[str]:
    """Invariant 3 by its effects: once an attempt wrote a training record, no earlier attempt writes one."""
    latest, bad = 0, []
    for rec in channel.read_progress(Path(run_dir) / channel.PROGRESS_FILE):
        if rec.get("event") not in ("log", "checkpoint"):
            continue
        n = int(rec.get("attempt") or 0)
        if n < latest:
            bad.append(f"attempt {n} wrote a {rec['event']} record (step {rec.get('step')}) after attempt {latest} "
                       "trained: two attempts trained at once")
            break
        latest = n
    return bad


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
    return bad + check_ledger(job) + (check_training_records(job["run_dir"]) if job.get("run_dir") else [])


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
                self.result.violations += [f"two attempts running at once for over {RUN_GRACE_S:.0f} s: {o}"
                                           for o in sampler.overlaps[:3]]
                self.result.violations += sampler.cancelled_running[:3]
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
        if (self.kind.startswith("second_host") or self.kind == "clock_offset") and not hosts.can_unshare():
            raise RuntimeError("a second host needs unshare with UTS and PID namespaces (root)")
        if self.kind == "clock_offset":
            if hosts.faketime_lib() is None:
                raise RuntimeError("a clock offset needs libfaketime (apt install faketime)")
            self.offset = self.rng.choice([-1, 1]) * round(self.rng.uniform(3, 10) * LEASE_S)
        if self.kind == "eexist_link":
            env["ORCHESTRATE_LEASE_FAULT"] = "eexist_after_link"
        if self.kind == "kill_marker_write":
            step = self.rng.choice([4, 8, 12, 16])
            env.update(LD_PRELOAD=str(hosts.marker_kill_preload(self.dir)),
                       CHAOS_KILL_ON_RENAME=f"checkpoint-{step}/{channel.CHECKPOINT_MARKER}")
            self.marker_step = step
        if self.kind == "second_host_cancel":   # it must still train when host B acts (it watches ~20 s first)
            overrides.update(max_steps=MAX_STEPS * 10)
        if self.kind == "clock_offset":         # likewise; adopted, never restarted: no weights to compare
            overrides.update(max_steps=MAX_STEPS * 3)
            self.reference = None
        cancelled = self.kind in ("cancel_race", "second_host_cancel")
        return ("CANCELLED" if cancelled else "COMPLETED"), write_config(self.dir, self.assets, **overrides), env

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
        sampler = AttemptSampler(self.job_id)
        sampler.run_dir = self.run_dir
        return sampler

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
        wait_for(lambda: _zombie(pid), 10)

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

    # -- issue 17: pauses, a second host, another clock, NFS, a torn marker write ----------------------
    def _supervisor_pid(self) -> int:
        pid = (status(self.home, self.job_id).get("supervisor") or {}).get("pid")
        if not pid:
            raise RuntimeError("no supervisor pid in status")
        return pid

    def _resume_here(self) -> None:
        r = cli(self.home, "resume", "--detach", self.job_id, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"resume failed: {r.stderr.strip()[-500:]}")

    def pause_supervisor(self) -> None:
        step = self._at_step()
        pid = self._supervisor_pid()
        seconds = round(self.rng.uniform(1.2, 2.0) * LEASE_S, 1)
        during = round(self.rng.uniform(0.5, 1.5) * LEASE_S, 1) if self.rng.random() < 0.5 else None
        hosts.signal_all([pid], signal.SIGSTOP)
        try:
            if during is not None:   # the user tries to resume meanwhile (too early: "already supervised")
                time.sleep(during)
                self._resume_here()
            time.sleep(max(0.0, seconds - (during or 0.0)))
        finally:
            hosts.signal_all([pid], signal.SIGCONT)
        gone = wait_for(lambda: _zombie(pid), 60)
        if not gone:
            self.result.violations.append(f"the paused supervisor (pid {pid}) still runs 60 s after SIGCONT: "
                                          "it should have found its lease lost and left")
        self._resume_here()        # the user resumes the job if nobody supervises it (else is told who does)
        self.result.note = (f"SIGSTOP the supervisor at step {step} for {seconds:.0f} s (lease {LEASE_S:.0f} s)"
                            + (f", resume tried {during:.0f} s in" if during is not None else "") + ", then resume")

    def pause_rank0(self) -> None:
        step = self._at_step()
        pid = rank_pids(self.job_id).get(0)
        seconds = round(self.rng.uniform(1.2, 2.5) * LEASE_S, 1)
        if pid:
            hosts.pause([pid], seconds)
        self.result.note = f"SIGSTOP rank 0 at step {step} for {seconds:.0f} s (lease {LEASE_S:.0f} s), then SIGCONT"

    def _on_b(self, *args: str, clock_offset_s: float | None = None) -> subprocess.CompletedProcess:
        return hosts.on_host(env_for(self.home), *args, cwd=str(self.dir), clock_offset_s=clock_offset_s, timeout=600)

    def _expect_refused(self, r: subprocess.CompletedProcess, here: str) -> None:
        """Host B refuses to resume while attempt 1 trains on A (unless it has ended meanwhile: then B may take
        the job over, and has; its own supervisor then runs the job to its end)."""
        ended = Path(self.run_dir, "attempts", "1", channel.STATUS_FILE).exists()
        if r.returncode == 0 and ended:
            self.result.note += " (attempt 1 had ended: host B took the job over)"
            return
        if r.returncode != 2 or f"still runs on {here}" not in r.stderr:
            self.result.violations.append(f"resume on {hosts.HOST_B} while the ranks train on {here}: exit "
                                          f"{r.returncode}, {(r.stdout + r.stderr).strip()[-300:]}")

    def second_host_cancel(self) -> None:
        """Host A's supervisor dies, its ranks train on: host B's resume refuses, its cancel stops them."""
        self._second_host("cancel")

    def second_host_crash(self) -> None:
        """Host A dies with every process of the job: host B takes the job over once the ranks fell silent."""
        self._second_host("crash")

    def second_host_freeze(self) -> None:
        """Host A freezes (every process stopped) and its supervisor dies: host B takes over; A wakes later."""
        self._second_host("freeze")

    def _second_host(self, variant: str) -> None:
        self.variant = variant
        step = self._at_step()
        self.result.note = f"second host at step {step}: {variant}"
        here = socket.gethostname()
        procs = [p.pid for p in job_processes(self.job_id)]
        if self.variant == "freeze":      # host A freezes: every process of the job stops, its supervisor dies
            hosts.signal_all(procs, signal.SIGSTOP)
        os.kill(self._supervisor_pid(), signal.SIGKILL)
        if self.variant == "crash":       # host A dies with everything on it
            hosts.signal_all(procs, signal.SIGKILL)
        if self.variant == "cancel":      # the ranks train on: host B may only coordinate
            self._expect_refused(self._on_b("resume", self.job_id), here)
            r = self._on_b("cancel", self.job_id)
            if r.returncode != 0 or "CANCELLED" not in r.stdout:
                self.result.violations.append(f"cancel on {hosts.HOST_B}: exit {r.returncode}, "
                                              f"{(r.stdout + r.stderr).strip()[-300:]}")
        else:                             # host B takes the job over (a foreground supervisor there)
            self.b_proc = hosts.start_on_host(env_for(self.home), "resume", self.job_id, log=self.dir / "host-b.log",
                                              cwd=str(self.dir))
            if self.variant == "freeze":
                started = wait_for(lambda: any(r.get("attempt", 0) >= 2 and r.get("event") == "log"
                                               for r in channel.read_progress(Path(self.run_dir) / channel.PROGRESS_FILE)),
                                   600, 0.2)
                time.sleep(self.rng.uniform(0, 3))
                hosts.signal_all(procs, signal.SIGCONT)   # host A wakes: its ranks must stop without writing
                if not started:
                    raise RuntimeError("the second host never trained attempt 2")

    def clock_offset(self) -> None:
        step = self._at_step(2, 6)
        here = socket.gethostname()
        r = self._on_b("resume", self.job_id, clock_offset_s=self.offset)   # the supervisor is alive on A
        if r.returncode != 0 or "already supervised" not in r.stdout:
            self.result.violations.append(f"resume on a host {self.offset:+.0f} s off while the supervisor runs: exit "
                                          f"{r.returncode}, {(r.stdout + r.stderr).strip()[-300:]}")
        os.kill(self._supervisor_pid(), signal.SIGKILL)
        self.result.note = f"a second host {self.offset:+.0f} s off at step {step}; supervisor killed; resumed here"
        self._expect_refused(self._on_b("resume", self.job_id, clock_offset_s=self.offset), here)
        self._resume_here()

    def eexist_link(self) -> None:
        step = self._at_step()
        self._kill_supervisor()
        r = cli(self.home, "resume", "--detach", self.job_id, timeout=300, ORCHESTRATE_LEASE_FAULT="eexist_after_link")
        if r.returncode != 0:
            raise RuntimeError(f"resume failed: {r.stderr.strip()}")
        self.result.note = f"every lease link answered EEXIST after succeeding; supervisor killed at step {step}"

    def kill_marker_write(self) -> None:
        out = Path(status(self.home, self.job_id)["output_dir"])
        torn = wait_for(lambda: list(out.glob(f"checkpoint-{self.marker_step}/.{channel.CHECKPOINT_MARKER}.*"))
                        or list(out.glob(f".incomplete/checkpoint-{self.marker_step}.*/.{channel.CHECKPOINT_MARKER}.*")),
                        600, 0.2)
        self.result.note = (f"rank 0 killed at the rename of checkpoint-{self.marker_step}'s marker"
                            + ("" if torn else " (no torn marker seen)"))

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
        b = getattr(self, "b_proc", None)
        if b is not None:
            try:
                b.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(b.pid, signal.SIGKILL)
                self.result.violations.append("the second host's supervisor did not exit with the job")
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

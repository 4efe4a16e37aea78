"""Helpers for the integration tests that drive the real CLI (real torchrun, 2 CPU ranks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp: Path, assets: Path, name: str = "job", launch: dict | None = None, **overrides) -> Path:
    """configs/demo.yaml with the model/data of ``assets`` and ``overrides`` applied."""
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["model_id"] = str(assets / "model")
    cfg["dataset_path"] = str(assets / "data")
    cfg.update(overrides)
    base_launch = cfg.get("launch") or {}
    cfg["launch"] = {**base_launch, "nproc_per_node": 2, **(launch or {})}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def env_for(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATE_")}
    env["ORCHESTRATE_HOME"] = str(home)
    env.update(extra)
    return env


def orch(home: Path, *args: str, cwd: Path | None = None, timeout: float = 300, env_extra=None,
         **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env_for(home, **(env_extra or {})),
                          capture_output=True, text=True, timeout=timeout, **kw)


def start_orch(home: Path, *args: str, cwd: Path | None = None, env_extra=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd,
                            env=env_for(home, **(env_extra or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def status(home: Path, job_id: str) -> dict:
    r = orch(home, "status", job_id, "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll ``predicate`` until it returns something truthy (files and the ledger are the events)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_end(home: Path, job_id: str, timeout: float = 420) -> dict:
    """The job's status once it is COMPLETED, FAILED or CANCELLED."""
    return wait_for(lambda: (lambda j: j if j["state"] in ("COMPLETED", "FAILED", "CANCELLED") else None)(
        status(home, job_id)), timeout, f"{job_id} to end", interval=0.3)


def submit_detached(tmp_path: Path, assets: Path, launch: dict, env=None, **training) -> tuple[Path, str]:
    """The demo config with ``training`` keys and ``launch``, submitted --detach: ``(home, job id)``."""
    cfg = write_config(tmp_path, assets, launch=launch, **training)
    home = tmp_path / "home"
    r = orch(home, "submit", "--detach", str(cfg), cwd=tmp_path, env_extra=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return home, r.stdout.strip()


# A short demo job that saves often (8 steps, a checkpoint every 2), quick to retry: the save tests' job.
SMALL_LAUNCH = {"retry": {"backoff_s": 0.5, "max_restarts": 4}, "watchdog": {"startup_timeout_s": 300}}
SMALL_TRAINING = dict(max_steps=8, save_steps=2, logging_steps=1, save_total_limit=1)


def submit_small(tmp_path: Path, assets: Path, env=None, launch=None, **training) -> tuple[Path, str]:
    """:func:`submit_detached` of the short job, with ``launch`` and ``training`` keys on top."""
    return submit_detached(tmp_path, assets, {**SMALL_LAUNCH, **(launch or {})}, env=env,
                           **{**SMALL_TRAINING, **training})


def progress(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "progress.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def max_logged_step(run_dir) -> int:
    return max((r.get("step", 0) for r in progress(run_dir) if r.get("event") == "log"), default=0)


def job_processes(job_id: str) -> list[int]:
    """PIDs of live processes tagged with the job id (what must be gone after cancel)."""
    pids = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("ORCHESTRATE_JOB_ID") == job_id and p.status() != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


def single_job_id(home: Path) -> str:
    r = orch(home, "list", "--json", timeout=60)
    jobs = json.loads(r.stdout)
    assert len(jobs) == 1, jobs
    return jobs[0]["id"]


class Tmux:
    """A private tmux server (its own socket) so that the test never touches a user's sessions."""

    def __init__(self):
        self.socket = f"orch-test-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], check=True,
                              capture_output=True, text=True, timeout=30).stdout

    def start(self, name: str, command: str) -> None:
        if self.alive():
            self("new-window", "-d", "-n", name, command)
        else:
            self("new-session", "-d", "-s", "t", "-n", name, "-x", "200", "-y", "50", command)
        self("set-option", "-t", f"t:{name}", "remain-on-exit", "on")

    def alive(self) -> bool:
        return subprocess.run(["tmux", "-L", self.socket, "has-session", "-t", "t"],
                              capture_output=True).returncode == 0

    def screen(self, name: str) -> str:
        return self("capture-pane", "-p", "-t", f"t:{name}")

    def dead(self, name: str) -> bool:
        return self("display-message", "-p", "-t", f"t:{name}", "#{pane_dead}").strip() == "1"

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def run_attempt_directly(plan, worker_config: dict, tmp_path: Path, timeout: float = 600) -> tuple[int, str]:
    """Attempt 1 of ``plan`` run as the backend runs it (``plan.argv``, ``plan.attempt_env``) but without a
    supervisor: ``(torchrun's exit code, its log)``."""
    plan.paths.attempt_dir(1).mkdir(parents=True)
    plan.paths.worker_config.write_text(yaml.safe_dump(dict(worker_config)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATE_", "ACCELERATE_", "FSDP_"))}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), **plan.attempt_env(1, None)})
    with open(tmp_path / "agent.log", "w") as log:
        rc = subprocess.run(plan.argv(1), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            timeout=timeout).returncode
    return rc, (tmp_path / "agent.log").read_text()

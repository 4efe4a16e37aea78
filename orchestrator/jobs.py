"""The library API behind the CLI verbs: submit, supervise, cancel, resume.

The CLI is a thin layer over these functions; tests call them directly too.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from . import channel
from .config import ConfigError, JobConfig, load_config
from .errors import JobError  # noqa: F401  (re-exported)
from .checkpoints import list_checkpoints
from .ledger import Job, Ledger
from .paths import RunPaths, ledger_path, orchestrate_home
from .plan import LaunchPlan, default_worker_script, make_plan
from .states import JobState
from .topology import Topology, detect_topology

HEARTBEAT_STALE_S = 30.0


def open_ledger(home: Path | None = None) -> Ledger:
    return Ledger(ledger_path(home or orchestrate_home()))


def new_job_id(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:40] or "job"
    return f"{safe}-{time.strftime('%m%d')}-{secrets.token_hex(3)}"


def prepare(config_path: str, *, home: Path | None = None, topology: Topology | None = None,
            cwd: str | None = None, job_id: str | None = None) -> tuple[JobConfig, LaunchPlan]:
    """Validate and plan without side effects (what ``--dry-run`` shows)."""
    cwd = cwd or os.getcwd()
    cfg = load_config(config_path, cwd=cwd)
    topo = topology or detect_topology()
    home = home or orchestrate_home()
    plan = make_plan(cfg, topo, job_id=job_id or new_job_id(cfg.name), home=home, python=sys.executable,
                     worker_script=default_worker_script(), workdir=cwd)
    return cfg, plan


def check_output_dir(plan: LaunchPlan, cfg: JobConfig, ledger: Ledger) -> None:
    """Refuse an output_dir that holds another job's (or anybody's) checkpoints."""
    out = plan.output_dir
    owners = [j for j in ledger.jobs_using_output_dir(out) if j.id != plan.job_id]
    ckpts = list_checkpoints(out)
    active = [j for j in owners if not j.state.is_terminal]
    if active:
        raise ConfigError(str(cfg.source), [f"output_dir: {out} is in use by running job {active[0].id}"])
    if ckpts and owners:
        raise ConfigError(str(cfg.source), [
            f"output_dir: {out} holds checkpoints of job {owners[-1].id}; resume that job with "
            f"'orchestrate resume {owners[-1].id}' or choose another output_dir (nothing was overwritten)"])
    if ckpts and not cfg.training.get("resume_from_checkpoint"):
        raise ConfigError(str(cfg.source), [
            f"output_dir: {out} already holds checkpoints ({ckpts[0][1].name}, ...) not written by an "
            "orchestrate job; choose another output_dir, or set resume_from_checkpoint to continue from one"])


def create_job(cfg: JobConfig, plan: LaunchPlan, ledger: Ledger) -> Job:
    """Write the run directory and the ledger entry; the job is PENDING afterwards."""
    check_output_dir(plan, cfg, ledger)
    paths = plan.paths
    paths.run_dir.mkdir(parents=True, exist_ok=False)
    shutil.copyfile(cfg.source, paths.submitted_config)
    paths.worker_config.write_text(yaml.safe_dump(dict(plan.worker_config), sort_keys=True))
    channel.write_json_atomic(paths.plan, plan.to_dict())
    ledger.create_job(job_id=plan.job_id, name=plan.name, backend=plan.backend, run_dir=plan.run_dir,
                      config_path=str(cfg.source), output_dir=plan.output_dir,
                      max_steps=plan.worker_config.get("max_steps") if plan.worker_config.get("max_steps", -1) > 0
                      else None)
    return ledger.get(plan.job_id)


def load_plan(job: Job) -> LaunchPlan:
    data = channel.read_json(RunPaths(Path(job.run_dir)).plan)
    if data is None:
        raise JobError(f"{job.id}: plan.json missing in {job.run_dir}")
    return LaunchPlan.from_dict(data)


def resolve_job(ledger: Ledger, ref: str) -> Job:
    ids = ledger.find(ref)
    if not ids:
        raise JobError(f"no job '{ref}' in the ledger ({ledger.path})")
    if len(ids) > 1:
        raise JobError(f"'{ref}' matches several jobs: {', '.join(ids[:5])}")
    return ledger.get(ids[0])


def supervisor_alive(job: Job) -> bool:
    """True if a supervisor process holds the job (alive and heart-beating)."""
    if not job.supervisor_pid:
        return False
    try:
        import psutil

        p = psutil.Process(job.supervisor_pid)
        alive = p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False
    return alive and (time.time() - (job.heartbeat or 0)) < HEARTBEAT_STALE_S


def spawn_supervisor(job_id: str, home: Path, resume: bool = False) -> int:
    """Start a background supervisor that survives the terminal; return its PID."""
    run_dir = RunPaths.for_job(home, job_id).run_dir
    argv = [sys.executable, "-m", "orchestrator.daemon", job_id] + (["--resume"] if resume else [])
    env = {**os.environ, "ORCHESTRATE_HOME": str(home)}
    env.pop(channel.ENV_JOB_ID, None)
    with open(run_dir / "supervisor.log", "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, cwd=str(run_dir))
    return proc.pid

"""Creating a job from a plan (run directory + ledger entry) and reading its frozen plan back."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

import yaml

from ..config import ConfigError, JobConfig
from ..errors import JobError
from ..plan import LaunchPlan
from ..store.lease import LeaseLost
from ..store.ledger import Job, Ledger
from ..store.paths import RunPaths
from ..store.private import DIR_MODE, check_private_tree, ensure_private_dir, write_private
from ..worker import channel
from ..worker.checkpoints import list_checkpoints


def check_output_dir(plan: LaunchPlan, cfg: JobConfig, ledger: Ledger) -> None:
    """Refuse an output_dir that holds another job's (or anybody's) checkpoints."""
    out = plan.output_dir
    owners = [j for j in ledger.jobs_using_output_dir(out) if j.id != plan.job_id] if ledger is not None else []
    ckpts = list_checkpoints(out)
    active = [j for j in owners if not j.state.is_terminal]
    if active:
        raise ConfigError(str(cfg.source), [f"output_dir: {out} is in use by running job {active[0].id}"])
    if ckpts and owners:
        owner = owners[-1]
        if owner.state.value == "COMPLETED":   # resume answers "already completed": offer what works
            raise ConfigError(str(cfg.source), [
                f"output_dir: {out} holds the checkpoints of job {owner.id}, which COMPLETED; choose another "
                f"output_dir, or to train it further start a new job with another output_dir, "
                f"resume_from_checkpoint: {ckpts[0][1]} and a larger max_steps (nothing was overwritten)"])
        raise ConfigError(str(cfg.source), [
            f"output_dir: {out} holds checkpoints of job {owner.id} ({owner.state.value}); continue that job "
            f"with 'orchestrate resume {owner.id}' or choose another output_dir (nothing was overwritten)"])
    if ckpts and not cfg.training.get("resume_from_checkpoint"):
        raise ConfigError(str(cfg.source), [
            f"output_dir: {out} already holds checkpoints ({ckpts[0][1].name}, ...) not written by an "
            "orchestrate job; choose another output_dir, or set resume_from_checkpoint to continue from one"])


def create_job(cfg: JobConfig, plan: LaunchPlan, ledger: Ledger) -> Job:
    """Write the run directory and the ledger entry; the job is PENDING afterwards."""
    check_output_dir(plan, cfg, ledger)
    paths = plan.paths
    ensure_private_dir(paths.run_dir.parent, "the jobs' folder")
    paths.run_dir.mkdir(mode=DIR_MODE, exist_ok=False)
    os.chmod(paths.run_dir, DIR_MODE)   # the job's controls (requests, lease, plan) are the owner's alone
    # launch.env may carry tokens: the copies are 0600 (plan.json too: write_json_atomic makes 0600 files)
    if plan.overrides:   # issue 19: the frozen config is the file with the command line's KEY=VALUE set
        write_private(paths.submitted_config,
                      f"# {cfg.source} with {' '.join(plan.overrides)} (orchestrate submit KEY=VALUE)\n"
                      + yaml.safe_dump(_with_overrides(yaml.safe_load(Path(cfg.source).read_text()), plan),
                                       sort_keys=False))
    else:
        write_private(paths.submitted_config, Path(cfg.source).read_text())
    write_private(paths.worker_config, yaml.safe_dump(dict(plan.worker_config), sort_keys=True))
    channel.write_json_atomic(paths.plan, plan.to_dict())
    ledger.create_job(job_id=plan.job_id, name=plan.name, backend=plan.backend, run_dir=plan.run_dir,
                      config_path=str(cfg.source), output_dir=plan.output_dir,
                      max_steps=plan.worker_config.get("max_steps") if plan.worker_config.get("max_steps", -1) > 0
                      else None)
    return ledger.get(plan.job_id)


def fenced_plan(plan: LaunchPlan, gen: int) -> LaunchPlan:
    """``plan`` whose attempts carry lease generation ``gen`` to every rank (contract 2: the worker's fence)."""
    return replace(plan, env={**plan.env, channel.ENV_LEASE_GEN: str(gen)})


def start_fenced(backend, plan: LaunchPlan, lease, attempt: int, resume_from: str | None):
    """Start an attempt (its ranks get the lease generation), checking the lease just before and just after.

    Before: a pause since the attempt was written ahead, and a successor may have found it never started.
    After: a holder paused while starting ends what it started (the successor owns the job) and leaves.
    """
    lease.check()
    handle = backend.start(fenced_plan(plan, lease.gen), attempt, resume_from)
    try:
        lease.check()
    except LeaseLost:
        backend.kill(handle, grace_s=3.0)
        raise
    return handle


def load_plan(job: Job) -> LaunchPlan:
    """The job's frozen plan from its run directory (refused unless the run directory is the user's own:
    the plan names what the ranks execute)."""
    paths = RunPaths(Path(job.run_dir))
    check_private_tree(paths.plan, paths.run_dir, "the job's plan")
    data = channel.read_json(paths.plan)
    if data is None:
        raise JobError(f"{job.id}: plan.json missing in {job.run_dir}")
    return LaunchPlan.from_dict(data)


def replace_plan(job: Job, plan: LaunchPlan, attempt: int, *, fence: Callable[[], None]) -> Path:
    """Make ``plan`` the job's plan from attempt ``attempt + 1`` on (the lease holder only).

    The plan it replaces is kept as ``plan.<attempt>.json`` beside it (what attempts up to
    ``attempt`` ran); ``plan.json`` and the worker's config are replaced atomically. ``fence``
    (the holder's lease check) runs first: a holder that lost the job replaces nothing.
    """
    fence()
    paths = RunPaths(Path(job.run_dir))
    kept = paths.plan.with_name(f"plan.{attempt}.json")
    if paths.plan.exists() and not kept.exists():
        write_private(kept, paths.plan.read_text())
    write_private(paths.worker_config, yaml.safe_dump(dict(plan.worker_config), sort_keys=True))
    channel.write_json_atomic(paths.plan, plan.to_dict())
    return kept


def config_changes(job: Job) -> list[str]:
    """Keys whose value in the job's config file differs from the config it was submitted with
    (``launch.x.y`` for the launch section), each as ``key: old -> new``; empty if the file is gone."""
    paths = RunPaths(Path(job.run_dir))
    try:
        now = yaml.safe_load(Path(job.config_path).read_text()) or {}
        then = yaml.safe_load(paths.submitted_config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    plan = channel.read_json(paths.plan) or {}
    if plan.get("overrides") and isinstance(now, dict):   # they are in the frozen config, not edits of the file
        now = _with_overrides(now, LaunchPlan.from_dict(plan))
    return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(_diff(then, now).items())]


def _with_overrides(raw: dict, plan: LaunchPlan) -> dict:
    from ..config.overrides import apply_overrides, parse_overrides

    return apply_overrides(raw, parse_overrides(list(plan.overrides))[0])[0]


def _diff(a, b, prefix: str = "") -> dict[str, tuple]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: dict[str, tuple] = {}
        for key in sorted(set(a) | set(b), key=str):
            out.update(_diff(a.get(key), b.get(key), f"{prefix}{key}."))
        return out
    return {} if a == b else {prefix.rstrip("."): (a, b)}

"""Creating a job from a plan (run directory + ledger entry) and reading its frozen plan back."""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from ..config import ConfigError, JobConfig
from ..errors import JobError
from ..plan import LaunchPlan
from ..store.ledger import Job, Ledger
from ..store.paths import RunPaths
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
    paths.run_dir.mkdir(parents=True, exist_ok=False)
    if plan.overrides:   # issue 19: the frozen config is the file with the command line's KEY=VALUE set
        paths.submitted_config.write_text(
            f"# {cfg.source} with {' '.join(plan.overrides)} (orchestrate submit KEY=VALUE)\n"
            + yaml.safe_dump(_with_overrides(yaml.safe_load(Path(cfg.source).read_text()), plan), sort_keys=False))
    else:
        shutil.copyfile(cfg.source, paths.submitted_config)
    paths.worker_config.write_text(yaml.safe_dump(dict(plan.worker_config), sort_keys=True))
    channel.write_json_atomic(paths.plan, plan.to_dict())
    ledger.create_job(job_id=plan.job_id, name=plan.name, backend=plan.backend, run_dir=plan.run_dir,
                      config_path=str(cfg.source), output_dir=plan.output_dir,
                      max_steps=plan.worker_config.get("max_steps") if plan.worker_config.get("max_steps", -1) > 0
                      else None)
    return ledger.get(plan.job_id)


def load_plan(job: Job) -> LaunchPlan:
    """The job's frozen plan from its run directory."""
    data = channel.read_json(RunPaths(Path(job.run_dir)).plan)
    if data is None:
        raise JobError(f"{job.id}: plan.json missing in {job.run_dir}")
    return LaunchPlan.from_dict(data)


def replace_plan(job: Job, plan: LaunchPlan, attempt: int) -> Path:
    """Make ``plan`` the job's plan from attempt ``attempt + 1`` on (the lease holder only).

    The plan it replaces is kept as ``plan.<attempt>.json`` beside it (what attempts up to
    ``attempt`` ran); ``plan.json`` and the worker's config are replaced atomically.
    """
    paths = RunPaths(Path(job.run_dir))
    kept = paths.plan.with_name(f"plan.{attempt}.json")
    if paths.plan.exists() and not kept.exists():
        shutil.copyfile(paths.plan, kept)
    tmp = paths.worker_config.with_name(paths.worker_config.name + ".tmp")
    tmp.write_text(yaml.safe_dump(dict(plan.worker_config), sort_keys=True))
    tmp.replace(paths.worker_config)
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

"""Pure planning: (validated config, detected topology) -> a frozen LaunchPlan.

Nothing here touches the disk, the environment or a process; ``--dry-run`` prints
exactly what a backend would execute.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import channel
from .config import ConfigError, JobConfig
from .launch_config import RetryPolicy, WatchdogPolicy
from .paths import RunPaths
from .topology import Topology

AGENT_MODULE = "orchestrator.agent"  # torchrun plus a structured exit record


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to start any attempt of one job."""

    job_id: str
    name: str
    backend: str
    device: str                      # "cuda" or "cpu"
    nnodes: int
    nproc_per_node: int
    distributed: str                 # "fsdp", "ddp" or "single"
    python: str
    worker_script: str
    run_dir: str
    workdir: str                     # the submitting directory; the job runs there, like the seed
    output_dir: str
    worker_config: Mapping[str, Any]
    env: Mapping[str, str]
    stop_signal: str
    retry: RetryPolicy
    watchdog: WatchdogPolicy
    notices: tuple[str, ...] = field(default=())
    slurm: Mapping[str, Any] = field(default_factory=dict)  # validated launch.slurm (backend slurm only)
    # issue 6: the fast defaults chosen (perf.py) and the per-GPU memory estimate (memory.py)
    performance: Mapping[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> RunPaths:
        return RunPaths(Path(self.run_dir))

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def torchrun_args(self, attempt: int) -> list[str]:
        """torchrun's own arguments for one attempt (single node; SLURM adds rendezvous)."""
        return [
            "--standalone",  # c10d rendezvous on a free port: concurrent jobs never clash
            f"--nnodes={self.nnodes}",
            f"--nproc-per-node={self.nproc_per_node}",
            "--max-restarts=0",  # restarts are the supervisor's, counted per job
            f"--log-dir={self.paths.rank_log_dir(attempt)}",
            "--redirects=3",
            "--tee=3",
        ]

    def argv(self, attempt: int) -> list[str]:
        """The full command of the attempt's agent process."""
        return [self.python, "-m", AGENT_MODULE, *self.torchrun_args(attempt),
                self.worker_script, "--config", str(self.paths.worker_config)]

    def attempt_env(self, attempt: int, resume_from: str | None) -> dict[str, str]:
        """Variables added to the environment of an attempt."""
        env = dict(self.env)
        env[channel.ENV_ATTEMPT] = str(attempt)
        env[channel.ENV_ATTEMPT_DIR] = str(self.paths.attempt_dir(attempt))
        env[channel.ENV_RESUME_FROM] = resume_from or "none"
        return env

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["worker_config"] = dict(self.worker_config)
        d["env"] = dict(self.env)
        d["notices"] = list(self.notices)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LaunchPlan":
        d = dict(d)
        d["retry"] = RetryPolicy(**d["retry"])
        d["watchdog"] = WatchdogPolicy(**d["watchdog"])
        d["notices"] = tuple(d.get("notices", ()))
        return cls(**d)


def choose_nproc(requested: int | str, topo: Topology, use_cpu: bool) -> tuple[int, str, list[str], list[str]]:
    """``(nproc_per_node, device, notices, problems)`` for a single node."""
    notices: list[str] = []
    if topo.gpus > 0 and not use_cpu:
        if requested == "auto":
            return topo.gpus, "cuda", notices, []
        if requested > topo.gpus:
            return requested, "cuda", notices, [
                f"launch.nproc_per_node: {requested} processes but only {topo.gpus} GPU(s) are visible "
                "(CUDA_VISIBLE_DEVICES honoured)"]
        return requested, "cuda", notices, []
    if requested == "auto":
        notices.append("no GPU visible: CPU plan with 1 process (set launch.nproc_per_node to run more)")
        return 1, "cpu", notices, []
    if requested > topo.cpus:
        notices.append(f"launch.nproc_per_node: {requested} CPU processes on {topo.cpus} core(s) will be slow")
    return requested, "cpu", notices, []


def fsdp_env(training: Mapping[str, Any]) -> dict[str, str]:
    """The environment the seed sets by hand for FSDP (accelerate's variables)."""
    if not training.get("fsdp"):
        return {}
    env = {"ACCELERATE_USE_FSDP": "1"}
    fc = training.get("fsdp_config") if isinstance(training.get("fsdp_config"), dict) else {}
    # Only rank 0 reads the weights, the others get them by broadcast. accelerate
    # requires sync_module_states for that under FSDP1 (checked in config validation).
    if str(fc.get("cpu_ram_efficient_loading", "true")).lower() == "true":
        env["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "1"
    return env


def make_plan(cfg: JobConfig, topo: Topology, *, job_id: str, home: Path, python: str,
              worker_script: str, workdir: str, user_env: Mapping[str, str] | None = None) -> LaunchPlan:
    """Turn a validated config and the topology into a plan; raise ConfigError if they clash."""
    training = dict(cfg.training)
    use_cpu = bool(training.get("use_cpu"))
    nnodes, omp_threads, slurm = 1, None, {}
    if cfg.launch.backend == "slurm":  # issue 4: the allocation decides, not this host (slurm_plan.py)
        from .slurm_plan import path_problems, slurm_layout

        layout = slurm_layout(cfg.launch.slurm, cfg.launch.nproc_per_node)
        nnodes, nproc, device, omp_threads = layout.nnodes, layout.nproc_per_node, layout.device, layout.omp_threads
        notices, problems, slurm = list(layout.notices), list(layout.problems), layout.settings
        problems += path_problems({"ORCHESTRATE_HOME": str(home), "workdir": workdir, "python": python})
    else:
        nproc, device, notices, problems = choose_nproc(cfg.launch.nproc_per_node, topo, use_cpu)
    fc = training.get("fsdp_config") if isinstance(training.get("fsdp_config"), dict) else {}
    if device == "cpu":
        training["use_cpu"] = True  # gloo; without it FSDP ranks fail on a GPU-less machine
        if cfg.fsdp_enabled and str(fc.get("version", 2)) == "1":
            problems.append("fsdp_config.version: FSDP1 does not run on CPU; use version 2 (the default)")
        if training.get("bf16") or training.get("tf32"):
            notices.append("bf16/tf32 requested on a CPU plan; transformers may refuse them without a GPU")
    performance, perf_notices, perf_problems = _performance(cfg, training, topo, device, nnodes * nproc)
    notices += perf_notices
    problems += perf_problems
    if problems:
        raise ConfigError(str(cfg.source), problems, list(cfg.notices))
    paths = RunPaths.for_job(home, job_id)
    training.setdefault("output_dir", str(paths.default_output_dir))
    if cfg.fsdp_enabled and isinstance(training.get("fsdp_config"), dict):
        # transformers sets FSDP_CPU_RAM_EFFICIENT_LOADING from this key (default false),
        # overriding the environment the seed exported: make the two agree.
        fc = dict(training["fsdp_config"])
        fc.setdefault("cpu_ram_efficient_loading", True)
        training["fsdp_config"] = fc
    env = {**(user_env or {}), **dict(cfg.launch.env), **fsdp_env(training)}
    if device == "cpu" and "OMP_NUM_THREADS" not in env:
        # torchrun would force 1 thread per rank; share the cores instead.
        env["OMP_NUM_THREADS"] = str(omp_threads or max(1, topo.cpus // nproc))
    env.update({
        "PYTHONUNBUFFERED": "1",
        channel.ENV_JOB_ID: job_id,
        channel.ENV_RUN_DIR: str(paths.run_dir),
        channel.ENV_STOP_SIGNALS: cfg.launch.stop_signal,
    })
    distributed = "fsdp" if cfg.fsdp_enabled else ("ddp" if nproc > 1 else "single")
    return LaunchPlan(
        job_id=job_id, name=cfg.name, backend=cfg.launch.backend, device=device, nnodes=nnodes,
        nproc_per_node=nproc, distributed=distributed, python=python, worker_script=worker_script,
        run_dir=str(paths.run_dir), workdir=workdir, output_dir=training["output_dir"], worker_config=training,
        env=env, stop_signal=cfg.launch.stop_signal, retry=cfg.launch.retry,
        watchdog=cfg.launch.watchdog, notices=tuple(cfg.notices) + tuple(notices),
        slurm=slurm, performance=performance,
    )


def _performance(cfg: JobConfig, training: dict[str, Any], topo: Topology, device: str, world: int):
    """issue 6: apply the fast defaults to ``training`` (in place); see perf.py and memory.py.

    The only input read here is the model's ``config.json`` (validation already checked it exists).
    """
    from .memory import read_model_shape
    from .perf import plan_performance

    settings = cfg.launch.performance
    shape, source = read_model_shape(training.get("model_id"))
    gpu_memory = settings.gpu_memory_gib if settings.gpu_memory_gib != "auto" else (
        topo.gpu_memory_gib if cfg.launch.backend == "local" else None)
    return plan_performance(training, settings, device=device, world=world, fsdp=cfg.fsdp_enabled,
                            gpu_memory_gib=gpu_memory, liger_installed=topo.liger_installed,
                            model_shape=shape, model_source=source)


def default_worker_script() -> str:
    """Where the installed ``train_worker`` module lives (editable or regular install)."""
    import importlib.util

    spec = importlib.util.find_spec("train_worker")
    if spec is None or not spec.origin:
        raise RuntimeError("train_worker.py is not installed; run 'pip install -e .' in the repository")
    return os.path.abspath(spec.origin)


def describe_plan(plan: LaunchPlan, attempt: int = 1) -> str:
    """Human-readable plan for ``--dry-run``: the exact command, environment and paths."""
    import shlex

    import yaml

    paths = plan.paths
    env = plan.attempt_env(attempt, None)
    command = ["command         (orchestrator.agent runs torchrun's own main and records how it ended)",
               "  " + shlex.join(plan.argv(attempt)), "environment",
               *[f"  {k}={shlex.quote(v)}" for k, v in sorted(env.items())]]
    agent_log = paths.agent_log(attempt)
    if plan.backend == "slurm":  # issue 4: one torchrun per node inside the job (slurm_plan.py)
        command = ["command         one torchrun per node inside the SLURM job: see 'per-node command' below"]
        agent_log = paths.attempt_dir(attempt) / "nodes" / "<node>" / agent_log.name
    lines = [
        f"job             {plan.job_id}  (name {plan.name}, backend {plan.backend})",
        f"device          {plan.device}; nnodes {plan.nnodes}, nproc_per_node {plan.nproc_per_node}, "
        f"world size {plan.world_size}, distributed {plan.distributed}",
        f"workdir         {plan.workdir}",
        *command,
        "paths",
        f"  run dir         {paths.run_dir}",
        f"  output dir      {plan.output_dir}",
        f"  worker config   {paths.worker_config}",
        f"  progress        {paths.progress}",
        f"  agent log       {agent_log}",
        f"  rank logs       {paths.rank_log_dir(attempt)}",
        f"retry           {_fields(plan.retry)}",
        f"watchdog        {_fields(plan.watchdog)}",
        f"stop signal     {plan.stop_signal}",
        "worker config",
        *["  " + line for line in yaml.safe_dump(dict(plan.worker_config), sort_keys=True).splitlines()],
    ]
    if plan.backend == "slurm":
        from .slurm_plan import describe_lines

        lines += describe_lines(plan, attempt)
    if plan.performance:  # issue 6
        from .perf import describe_lines as performance_lines

        lines += performance_lines(plan.performance)
    if plan.notices:
        lines += ["notices", *[f"  {n}" for n in plan.notices]]
    return "\n".join(lines) + "\n"


def _fields(obj) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(obj).items())

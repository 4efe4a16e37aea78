"""Pure planning: (validated config, detected topology, model shape) -> a frozen LaunchPlan.

Nothing here touches the disk, the environment or a process: what must be read from
outside (the topology, the model's ``config.json``) is read by :mod:`orchestrator.plan.inputs`
and passed in. ``--dry-run`` prints exactly what a backend would execute.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError, JobConfig
from ..store.paths import RunPaths
from ..worker import channel
from .launch_plan import LaunchPlan
from .topology import Topology

NO_MODEL: tuple = (None, "model config not read")


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
        if requested < topo.gpus:   # issue 19: say so before GPUs sit idle for hours
            idle = topo.gpus - requested
            notices.append(f"launch.nproc_per_node: {requested} of {topo.gpus} GPUs used, {idle} would sit idle "
                           f"(nproc_per_node: auto uses them all; a --sweep runs {topo.gpus // requested} jobs "
                           "side by side)")
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
              worker_script: str, workdir: str, user_env: Mapping[str, str] | None = None,
              model: tuple = NO_MODEL) -> LaunchPlan:
    """Turn a validated config and the topology into a plan; raise ConfigError if they clash.

    ``model`` is :func:`orchestrator.plan.inputs.read_model_shape` of the config's ``model_id``
    (the memory estimate needs it; without it the plan says it has no estimate).
    """
    training = dict(cfg.training)
    use_cpu = bool(training.get("use_cpu"))
    nnodes, omp_threads, slurm = 1, None, {}
    if cfg.launch.backend == "slurm":  # issue 4: the allocation decides, not this host (plan/slurm.py)
        from .slurm import path_problems, slurm_layout

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
        if training.get("tf32") is not None:
            # only a hint for GPU matmuls, and transformers refuses it without an Ampere GPU
            notices.append(f"tf32: {training.pop('tf32')} dropped on a CPU plan (a GPU matmul precision hint; "
                           "on a GPU plan it passes through)")
        if training.get("bf16"):
            notices.append("bf16 requested on a CPU plan: it runs, slowly, where the CPU supports it")
    if cfg.launch.script:   # its arguments are its own: no keys of train_worker.py's (attn_implementation, ...)
        performance, perf_notices, perf_problems = {}, ["launch.performance: not applied to your own script "
                                                        "(set packing, optim, ... in the YAML yourself)"], []
    else:
        performance, perf_notices, perf_problems = _performance(cfg, training, topo, device, nnodes * nproc, model)
    notices += perf_notices
    problems += perf_problems
    if problems:
        raise ConfigError(str(cfg.source), problems, list(cfg.notices))
    paths = RunPaths.for_job(home, job_id)
    training.setdefault("output_dir", str(paths.default_output_dir))
    if cfg.fsdp_enabled and isinstance(training.get("fsdp_config") or {}, dict):
        # transformers sets FSDP_CPU_RAM_EFFICIENT_LOADING from this key (default false),
        # overriding the environment the seed exported: make the two agree.
        fc = dict(training.get("fsdp_config") or {})
        fc.setdefault("cpu_ram_efficient_loading", True)
        if "state_dict_type" not in fc and nnodes * nproc > 1:
            # issue 12: every rank writes its own shard (DCP, in the background); nothing is gathered on
            # rank 0. A FULL state dict only when asked for (fsdp_config.state_dict_type: FULL_STATE_DICT).
            # The default, not a notice (issue 19: nobody set it); --dry-run shows it in the worker config.
            fc["state_dict_type"] = "SHARDED_STATE_DICT"
        training["fsdp_config"] = fc
    every = cfg.launch.checkpoint
    if every.every_steps:
        training.update(save_strategy="steps", save_steps=every.every_steps)
    env = {**(user_env or {}), **dict(cfg.launch.env), **fsdp_env(training)}
    if every.every_s:   # the worker's callback: every rank agrees at the step boundary after it passed
        env[channel.ENV_SAVE_EVERY_S] = f"{every.every_s:g}"
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
    if cfg.launch.script:   # issue 13: the script runner runs the user's script with our callback installed
        worker_script = str(Path(__file__).resolve().parents[1] / "worker" / "script_runner.py")
    return LaunchPlan(
        job_id=job_id, name=cfg.name, backend=cfg.launch.backend, device=device, nnodes=nnodes,
        nproc_per_node=nproc, distributed=distributed, python=python, worker_script=worker_script,
        run_dir=str(paths.run_dir), workdir=workdir, output_dir=training["output_dir"], worker_config=training,
        env=env, stop_signal=cfg.launch.stop_signal, retry=cfg.launch.retry,
        watchdog=cfg.launch.watchdog, notices=tuple(cfg.notices) + tuple(notices),
        slurm=slurm, performance=performance, script=cfg.launch.script, notify=dict(cfg.launch.notify),
    )


def _performance(cfg: JobConfig, training: dict[str, Any], topo: Topology, device: str, world: int, model: tuple):
    """issue 6: apply the fast defaults to ``training`` (in place); see performance.py and memory.py."""
    from .performance import plan_performance

    settings = cfg.launch.performance
    shape, source = model
    gpu_memory = settings.gpu_memory_gib if settings.gpu_memory_gib != "auto" else (
        topo.gpu_memory_gib if cfg.launch.backend == "local" else None)
    return plan_performance(training, settings, device=device, world=world, fsdp=cfg.fsdp_enabled,
                            gpu_memory_gib=gpu_memory, liger_installed=topo.liger_installed,
                            model_shape=shape, model_source=source)

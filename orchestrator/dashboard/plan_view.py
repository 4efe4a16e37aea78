"""``orchestrate submit --dry-run``: a plan as text (the exact command, environment, paths,
the SLURM script, the performance choices and the memory estimate). Pure: a plan in, text out."""
from __future__ import annotations

import shlex
from dataclasses import asdict
from typing import Any, Mapping

import yaml

from ..plan import LaunchPlan
from ..plan import slurm as slurm_plan
from ..store.private import mask_env


def describe_plan(plan: LaunchPlan, attempt: int = 1) -> str:
    """Human-readable plan for ``--dry-run``: the exact command, environment and paths."""
    paths = plan.paths
    env = mask_env(plan.attempt_env(attempt, None))   # tokens in launch.env are never printed
    command = ["command         (orchestrator.worker.agent runs torchrun's own main and records how it ended)",
               "  " + shlex.join(plan.argv(attempt)), "environment",
               *[f"  {k}={shlex.quote(v)}" for k, v in sorted(env.items())]]
    agent_log = paths.agent_log(attempt)
    if plan.backend == "slurm":  # issue 4: one torchrun per node inside the job (plan/slurm.py)
        command = ["command         one torchrun per node inside the SLURM job: see 'per-node command' below"]
        agent_log = paths.attempt_dir(attempt) / "nodes" / "<node>" / agent_log.name
    lines = [
        f"job             {plan.job_id}  (name {plan.name}, backend {plan.backend})",
        f"device          {plan.device}; nnodes {plan.nnodes}, nproc_per_node {plan.nproc_per_node}, "
        f"world size {plan.world_size}, distributed {plan.distributed}",
        f"workdir         {plan.workdir}",
        *([f"overrides       {' '.join(plan.overrides)}   (KEY=VALUE of the command line)"] if plan.overrides else []),
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
        lines += slurm_lines(plan, attempt)
    if plan.performance:  # issue 6
        lines += performance_lines(plan.performance)
    if plan.notices:
        lines += ["notices", *[f"  {n}" for n in plan.notices]]
    return "\n".join(lines) + "\n"


def _fields(obj) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(obj).items())


def performance_lines(record: Mapping[str, Any]) -> list[str]:
    """The ``--dry-run`` section: one line per choice, then the memory estimate."""
    if not record:
        return []
    lines = ["performance     (explicit training keys win; launch.performance.<switch>: false turns a default off)"]
    for c in record.get("choices", []):
        value = c["value"]
        shown = ("on" if value else "off") if isinstance(value, bool) else str(value)
        lines.append(f"  {c['name']:<25}{shown:<20}[{c['source']}] {c['why']}")
    mem = record.get("memory") or {}
    if mem:
        lines.append("memory          (estimate per GPU, orchestrator/plan/memory.py)")
        n = mem.get("params")
        size = (f"; {n / 1e9:.3f} B parameters" if n >= 1e8 else f"; {n / 1e6:.2f} M parameters") if n else ""
        lines.append(f"  model           {mem.get('model')}{size}")
        wl = mem.get("workload") or {}
        if wl:
            lines.append("  workload        " + ", ".join(f"{k}={v}" for k, v in wl.items()))
        est = mem.get("estimate_gib")
        if est:
            host = est.get("host_offload") or 0
            lines.append("  estimate GiB    " + ", ".join(f"{k} {v}" for k, v in est.items() if k != "host_offload"))
            if host:   # with CPU offload the GPU holds none of them: say where they are
                world = int(wl.get("world") or 1)
                lines.append(f"  host memory     weights, grads and optimizer state offloaded to the CPU: {host} GiB "
                             f"per rank ({round(host * world, 2)} GiB over {world} ranks)")
        lines.append(f"  verdict         {mem.get('verdict')}")
    return lines


def slurm_lines(plan, attempt: int = 1) -> list[str]:
    """The SLURM part of ``orchestrate submit --dry-run``: the allocation, its supervisor, each attempt's step."""
    s = plan.slurm
    port = (f"<free port reserved on the first node, from {slurm_plan.RDZV_PORT_BASE} + (7 x job id + attempt) % "
            f"{slurm_plan.RDZV_PORT_SPAN}>")
    nodes = [f"<node {k + 1}>" for k in range(plan.nnodes)]
    step = slurm_plan.step_argv(plan, attempt, nodes, slurm_plan.job_python(plan))
    argv = slurm_plan.node_argv(plan, attempt, node="<node>", nnodes=plan.nnodes,
                                endpoint=f"<first node address>:{port}", rdzv_id="<SLURM job id>-<attempt>",
                                python=slurm_plan.job_python(plan))
    env = mask_env(slurm_plan.node_env(plan, attempt, None, node="<node>", slurm_job_id="<SLURM job id>"))
    min_nodes = slurm_plan.min_nodes(plan)
    return [
        f"slurm           profile {s.get('profile') or '(none)'}; {plan.nnodes} node(s) x 1 task "
        f"(goes on with at least {min_nodes}); {s.get('gpus_per_node') or 0} GPU(s) per node; time limit "
        f"{s['time_min']} min; {s['signal']} {s['signal_delay_s']} s before the limit to the running step, "
        "then requeue",
        "supervision     inside the allocation: its batch step runs the supervisor "
        "(python -m orchestrator.supervise.in_allocation); each attempt is a job step (srun) of it, so a "
        "crash restarts in place; the login node only submits and follows",
        f"submit          sbatch --parsable {slurm_plan.submitit_folder(plan)}/<job id>_submission.sh "
        "(through submitit)",
        "sbatch script",
        *["  " + line for line in slurm_plan.sbatch_script(plan).rstrip("\n").splitlines()],
        f"attempt step    (attempt {attempt}, on the nodes it gets)",
        "  " + shlex.join(step),
        "per-node command  (node <node> = SLURM_NODEID of the step; the step fills in what is in <>)",
        "  " + shlex.join(argv),
        "per-node environment (added to the job's environment, which sbatch and srun pass on)",
        *[f"  {k}={shlex.quote(v)}" for k, v in sorted(env.items())],
        "slurm paths",
        f"  submitit        {slurm_plan.submitit_folder(plan)}",
        f"  step spec       {slurm_plan.step_spec_path(plan, attempt)}",
        f"  node records    {slurm_plan.node_dir(plan, attempt, '<node>')}",
        f"  rank logs       {slurm_plan.node_log_dir(plan, attempt, '<node>')}",
    ]

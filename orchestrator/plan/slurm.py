"""Pure SLURM planning: (LaunchPlan, its ``slurm`` settings) -> what submitit submits and
what each step and node runs.

A job on SLURM is one allocation whose batch step runs the supervisor (the same loop as
locally); every attempt is a job step of that allocation, started with ``srun``, so a
restart after a crash does not go back to the queue.

* :func:`slurm_layout`: nodes, processes per node and device from the *allocation*
  (GPUs per node; on CPU-only nodes the configured count), not from the submitting host.
* :func:`executor_parameters` / :func:`sbatch_script`: the allocation as submitit submits it
  (``--dry-run`` prints the script).
* :func:`step_argv`: ``srun`` of one attempt on the nodes it gets.
* :func:`node_argv` / :func:`node_env`: the torchrun command and environment of one node
  (static rendezvous: node rank from SLURM, the TCP store on the first node, a port from the
  job id and the attempt). Only the step knows its node rank and first node's address, so
  the node launcher calls these with them (``backends/slurm/node.py``) and ``--dry-run``
  calls them with placeholders.

Run directory of a SLURM job (besides what every job has)::

    slurm/             submitit's folder: <jobid>_submission.sh, pickle, <jobid>_0_log.{out,err}
                       (the supervisor's output), allocations.jsonl (every allocation the job had),
                       nodes.json (failures per node; a node that failed twice is excluded)

Attempt directory of a SLURM attempt (``RunPaths.attempt_dir``)::

    step.json          what each node's launcher reads (plan, attempt, resume point)
    slurm.json         the allocation, step id, nodes and, once it ended, the step's final state
    srun.log           srun's own output
    nodes/<k>/         node k's ORCHESTRATE_ATTEMPT_DIR: torchrun.log, agent.json, node.json,
                       status.json (the node of global rank 0), error-rank<R>.json
    ranks/node<k>/     torchrun --log-dir of node k: every rank's stdout/stderr (global rank =
                       k * nproc_per_node + local rank)
    agent.json status.json error-rank<R>.json   merged from nodes/ when the step ended
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..worker import channel
from .launch_plan import AGENT_MODULE

RDZV_PORT_BASE = 20000   # c10d port = base + (job id, attempt) % span: the same on every node of a step
RDZV_PORT_SPAN = 10000
SUBMITIT_DIR = "slurm"
NODES_DIR = "nodes"
JOB_RECORD = "slurm.json"
NODE_RECORD = "node.json"
ENV_SLURM_JOB = "ORCHESTRATE_SLURM_JOB_ID"
ENV_NODE = "ORCHESTRATE_NODE"
NODE_MODULE = "orchestrator.backends.slurm.node"
STEP_SPEC = "step.json"


@dataclass(frozen=True)
class SlurmLayout:
    """What the allocation gives each node."""

    nnodes: int
    nproc_per_node: int
    device: str
    omp_threads: int | None
    notices: tuple[str, ...]
    problems: tuple[str, ...]
    settings: dict                   # every key of config.slurm.FIELDS, what LaunchPlan.slurm holds


def slurm_layout(settings: Mapping[str, Any], requested_nproc: int | str) -> SlurmLayout:
    """Processes per node: GPUs per node, or ``launch.nproc_per_node`` on CPU-only nodes."""
    from ..config.slurm import defaults

    settings = {**defaults(), **settings}
    gpus, nodes = int(settings["gpus_per_node"] or 0), int(settings["nodes"] or 1)
    cpus = settings["cpus_per_task"]
    notices: list[str] = []
    problems: list[str] = []
    if not settings["time_min"]:
        problems.append("launch.slurm.time: required for backend slurm (the job's time limit, e.g. 04:00:00)")
    if gpus > 0:
        nproc = gpus if requested_nproc == "auto" else int(requested_nproc)
        if nproc > gpus:
            problems.append(f"launch.nproc_per_node: {nproc} processes per node but launch.slurm.gpus_per_node "
                            f"is {gpus}")
        return SlurmLayout(nodes, nproc, "cuda", None, tuple(notices), tuple(problems), settings)
    if requested_nproc == "auto":
        nproc = 1
        notices.append("SLURM CPU nodes (gpus_per_node 0): 1 process per node (set launch.nproc_per_node to run more)")
    else:
        nproc = int(requested_nproc)
    if cpus and nproc > cpus:
        notices.append(f"launch.nproc_per_node: {nproc} CPU processes per node on {cpus} CPU(s) per task will be slow")
    threads = max(1, int(cpus) // nproc) if cpus else 1
    return SlurmLayout(nodes, nproc, "cpu", threads, tuple(notices), tuple(problems), settings)


def path_problems(paths: Mapping[str, str]) -> list[str]:
    """Paths written into the sbatch script may hold anything but a newline (quoting can't span #SBATCH lines)."""
    return [f"{what}: {p!r} contains a newline, which cannot be written into an sbatch script"
            for what, p in paths.items() if "\n" in p or "\r" in p]


# ---- paths ----------------------------------------------------------------------------------

def submitit_folder(plan) -> Path:
    """submitit's folder of the job: every allocation's sbatch script, pickles and batch logs."""
    return Path(plan.run_dir).absolute() / SUBMITIT_DIR


def node_dir(plan, attempt: int, node: int | str) -> Path:
    """Node ``node``'s ``ORCHESTRATE_ATTEMPT_DIR`` (its records, before they are merged)."""
    return plan.paths.attempt_dir(attempt) / NODES_DIR / str(node)


def node_log_dir(plan, attempt: int, node: int | str) -> Path:
    """torchrun's ``--log-dir`` on node ``node`` (under ``ranks/``, where ``orchestrate logs`` looks)."""
    return plan.paths.rank_log_dir(attempt) / f"node{node}"


def rendezvous_port(slurm_job_id: str, attempt: int | str = 0) -> int:
    """A port every node of a step computes alike: from the job id and the attempt (a step after a
    failed one in the same allocation does not wait for the old store's port to be released)."""
    digits = "".join(ch for ch in str(slurm_job_id) if ch.isdigit()) or "0"
    n = int(attempt) if str(attempt).isdigit() else 0
    return RDZV_PORT_BASE + (int(digits) * 7 + n) % RDZV_PORT_SPAN


def min_nodes(plan) -> int:
    """The fewest nodes the job may go on with after node failures (``launch.slurm.min_nodes``)."""
    return int(plan.slurm.get("min_nodes") or plan.nnodes)


# ---- the allocation (submitit) ----------------------------------------------------------------

def job_python(plan) -> str:
    """The interpreter that runs submitit (and so the supervisor and each node's launcher) inside the job."""
    return plan.slurm.get("python") or plan.python


def executor_parameters(plan) -> dict[str, Any]:
    """Keyword arguments of ``SlurmExecutor.update_parameters`` for the job's allocation.

    The batch step runs the supervisor itself (``use_srun: False``: in the batch shell, on the first
    node); every attempt is a job step it starts with ``srun`` (:func:`step_argv`). ``--requeue``: after
    the time-limit signal the supervisor requeues the job (``scontrol requeue``), which then continues
    in a new allocation under the same SLURM job id. ``--no-kill``: the loss of a node does not end the
    allocation; the supervisor goes on without it. ``--signal``: the ranks of the running step get it.
    """
    s = plan.slurm
    params: dict[str, Any] = {
        "job_name": plan.name,
        "comment": f"orchestrate {plan.job_id}",   # squeue -o %k shows whose job it is
        "time": int(s["time_min"]),
        "nodes": plan.nnodes,
        "ntasks_per_node": 1,           # one launcher per node in each step; it runs torchrun, which runs the ranks
        "signal_delay_s": int(s["signal_delay_s"]),
        "setup": [*list(s.get("setup") or []), private_guard(plan)],
        "use_srun": False,
        "wckey": None,                  # submitit's default "submitit" is rejected where wckeys are enforced
        "additional_parameters": {"signal": f"{s['signal']}@{int(s['signal_delay_s'])}", "requeue": True,
                                  "no-kill": True, **dict(s.get("extra") or {})},
    }
    if plan.device == "cuda":
        params["gpus_per_node"] = int(s["gpus_per_node"])
    for key in ("partition", "cpus_per_task", "mem", "account", "qos", "constraint"):
        if s.get(key) is not None:
            params[key] = s[key]
    if s.get("exclusive"):
        params["exclusive"] = True
    return params


def private_guard(plan) -> str:
    """The batch script's last setup line: refuse to go on (exit 2) unless the run directory and submitit's
    folder, whose pickle the next line unpickles, are the owner's alone (``orchestrator.store.private``)."""
    folder = submitit_folder(plan)
    return " ".join([shlex.quote(job_python(plan)), "-m", "orchestrator.store.private",
                     shlex.quote(str(Path(plan.run_dir).absolute())), shlex.quote(str(folder)), "|| exit 2"])


def submit_command(python: str, folder: Path) -> str:
    """What submitit runs in the batch step (``SlurmExecutor._submitit_command_str``)."""
    return " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(plan) -> str:
    """The exact sbatch script submitit writes for the job's allocation (``%j`` is filled in by SLURM)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = submitit_folder(plan)
    return _make_sbatch_string(command=submit_command(job_python(plan), folder), folder=folder,
                               **executor_parameters(plan))


def step_argv(plan, attempt: int, nodes: list[str], python: str) -> list[str]:
    """``srun``: attempt ``attempt`` as a job step on ``nodes`` of the allocation, one launcher per node.

    ``--kill-on-bad-exit``: one node failing ends the step on every node (no rank left blocked in a
    collective). ``--overlap``: the step may use the CPUs the batch step (the supervisor) shares.
    """
    cpus = plan.slurm.get("cpus_per_task")
    return ["srun", f"--nodes={len(nodes)}", f"--ntasks={len(nodes)}", "--ntasks-per-node=1",
            f"--nodelist={','.join(nodes)}", "--kill-on-bad-exit=1", "--overlap", "--unbuffered",
            f"--job-name=orchestrate-{plan.job_id}-a{attempt}",
            *([f"--cpus-per-task={int(cpus)}"] if cpus else []),
            python, "-u", "-m", NODE_MODULE, str(step_spec_path(plan, attempt))]


def step_spec_path(plan, attempt: int) -> Path:
    """What each node's launcher reads: the plan, the attempt, where it resumes from."""
    return plan.paths.attempt_dir(attempt) / STEP_SPEC


# ---- inside the job ----------------------------------------------------------------------

def node_argv(plan, attempt: int, *, node: int | str, nnodes: int, endpoint: str, rdzv_id: str,
              python: str) -> list[str]:
    """torchrun on one node: node rank from SLURM, the c10d TCP store on the first node's address.

    The node set of a SLURM job is fixed and known, so the rendezvous is torchrun's ``static``
    one: node ``k`` gets global ranks ``k * nproc_per_node ...`` (contiguous, in SLURM's node
    order; rank 0 and the store on the first node), with no membership negotiation to wait for.
    """
    return [
        python, "-m", AGENT_MODULE,
        f"--nnodes={nnodes}",
        f"--node-rank={node}",
        f"--nproc-per-node={plan.nproc_per_node}",
        "--rdzv-backend=static",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={rdzv_id}",
        "--max-restarts=0",                # restarts are the supervisor's, counted per job
        f"--log-dir={node_log_dir(plan, attempt, node)}",
        "--redirects=3",
        "--tee=3",
        *plan.worker_args(),
    ]


def node_env(plan, attempt: int, resume_from: str | None, *, node: int | str, slurm_job_id: str) -> dict[str, str]:
    """The variables added to a node's environment (the same FSDP environment as locally)."""
    env = plan.attempt_env(attempt, resume_from)
    env[channel.ENV_ATTEMPT_DIR] = str(node_dir(plan, attempt, node))
    # The ranks stop gracefully on SLURM's signal too, not only on launch.stop_signal.
    wanted = [*str(env.get(channel.ENV_STOP_SIGNALS) or "").split(","), f"SIG{plan.slurm.get('signal') or 'USR2'}"]
    env[channel.ENV_STOP_SIGNALS] = ",".join(dict.fromkeys(n.strip() for n in wanted if n.strip()))
    env[ENV_SLURM_JOB] = str(slurm_job_id)
    env[ENV_NODE] = str(node)
    return env

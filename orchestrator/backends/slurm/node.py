"""The code that runs in each task of an attempt's job step, once per node.

``srun`` (started by the supervisor in the batch step, :mod:`.steps`) runs
``python -m orchestrator.backends.slurm.node STEP_SPEC`` on every node of the step. It reads
the node rank, the node list and the job id from SLURM's step environment, builds this node's torchrun
command (``plan.slurm.node_argv``: static rendezvous, the store on the first node's address, a port
derived from the job id) and runs ``python -m orchestrator.worker.agent`` with it, the same
launcher and worker as locally.

Signals. SLURM sends the time-limit/preemption signal (``--signal=USR2@90``) and a cancel's
SIGTERM to every process of the step: this launcher, torchrun and the ranks. torchrun
handles SIGTERM (it stops its ranks) but neither forwards nor handles SIGUSR1/2, whose
default action would kill it while the ranks save their checkpoint. So torchrun is started
with USR1/USR2 ignored (an ignored disposition survives ``exec``; the ranks install their
own handlers), and this launcher passes any USR1/USR2 it receives on to torchrun's children,
the ranks, so that every rank learns of it even where SLURM signals only the task itself.
The launcher also adopts ranks orphaned by a dead torchrun and ends them before it returns.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ...plan import slurm as slurm_plan
from ...worker import channel
from . import rendezvous

FORWARDED = (signal.SIGUSR1, signal.SIGUSR2)
AGENT_LOG = "torchrun.log"


class NodeFailed(RuntimeError):
    """torchrun on this node failed; raising makes the task exit non-zero, so that
    ``srun --kill-on-bad-exit`` ends the other nodes at once instead of leaving them blocked
    in a collective."""


def step_environment(environ=None) -> tuple[int, int, str, str | None, list[str]]:
    """``(node rank, nodes, SLURM job id, step id, hostnames)`` of this task of a job step."""
    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or socket.gethostname()
    return (int(env.get("SLURM_NODEID", "0")), int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1),
            str(env.get("SLURM_JOB_ID", "0")), env.get("SLURM_STEP_ID"), expand_hostnames(nodelist))


def expand_hostnames(nodelist: str, run=subprocess.run) -> list[str]:
    """``n[1-3]`` -> ``[n1, n2, n3]`` (``scontrol show hostnames``; a plain list is split by hand)."""
    if "[" not in nodelist:
        return [h for h in nodelist.split(",") if h]
    out = run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    names = out.stdout.split()
    if out.returncode != 0 or not names:
        raise RuntimeError(f"cannot expand the node list {nodelist!r}: {out.stderr.strip()}")
    return names


def run_node(spec: dict, environ=None) -> dict:
    """Run this node's share of attempt ``spec["attempt"]`` (a task of its job step); return its node record."""
    from ...plan import LaunchPlan

    plan = LaunchPlan.from_dict(spec["plan"])
    attempt, resume_from = int(spec["attempt"]), spec.get("resume_from")
    node, nnodes, slurm_job, step, hostnames = step_environment(environ)
    ndir = slurm_plan.node_dir(plan, attempt, node)
    ndir.mkdir(parents=True, exist_ok=True)
    record: dict = {"node": node, "nnodes": nnodes, "hostname": socket.gethostname(), "slurm_job_id": slurm_job,
                    "slurm_step_id": step, "nodes": hostnames, "pid": os.getpid(), "started": time.time()}
    channel.write_json_atomic(ndir / slurm_plan.NODE_RECORD, record)
    # The store's port: reserved on the first node (no other job's step there holds it), published to the others.
    held = rendezvous.reserve(slurm_plan.rendezvous_port(slurm_job, attempt)) if node == 0 else None
    try:
        if held is not None:
            endpoint = f"{first_node_address(hostnames)}:{held.port}"
            rendezvous.publish(plan, attempt, endpoint)
        else:
            endpoint = rendezvous.published(plan, attempt)
        argv = slurm_plan.node_argv(plan, attempt, node=node, nnodes=nnodes, endpoint=endpoint,
                                    rdzv_id=f"{slurm_job}-{attempt}", python=sys.executable)
        env = {**os.environ, **slurm_plan.node_env(plan, attempt, resume_from, node=node, slurm_job_id=slurm_job)}
        record.update(endpoint=endpoint, argv=argv)
        rc, received = run_agent(argv, env, plan.workdir, ndir / AGENT_LOG)
    finally:
        if held is not None:
            held.close()
    record.update(exit_code=rc, signals=received, ended=time.time())
    channel.write_json_atomic(ndir / slurm_plan.NODE_RECORD, record)
    if rc not in (0, channel.EXIT_STOPPED):
        raise NodeFailed(f"node {node}: torchrun ended with status {rc}; see {ndir / AGENT_LOG}")
    return record


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestrator.backends.slurm.node STEP_SPEC``: one task of an attempt's job step."""
    from ...store.private import NotPrivate, check_private_tree, private_umask

    argv = sys.argv[1:] if argv is None else argv
    private_umask()
    spec = channel.read_json(argv[0])
    if spec is None:
        print(f"orchestrate: no step spec at {argv[0]}", file=sys.stderr)
        return 2
    try:   # the spec names what this node executes: only if nobody but its owner could have written it
        check_private_tree(argv[0], spec["plan"]["run_dir"], "the step spec")
    except NotPrivate as exc:
        print(f"orchestrate: refusing to run: {exc}", file=sys.stderr)
        return 2
    try:
        run_node(spec)
    except NodeFailed as exc:
        print(f"orchestrate: {exc}", file=sys.stderr)
        return 1
    return 0


def run_agent(argv: list[str], env: dict, cwd: str, log_path: Path,
              adopt_orphans: bool = True) -> tuple[int, list[dict]]:
    """Run the torchrun agent with USR1/USR2 ignored; pass those signals on to its ranks.

    ``adopt_orphans``: make this process a subreaper and end any rank torchrun left behind.
    Returns ``(exit status, [{"signal", "time"} for each signal passed on])``.
    """
    received: list[dict] = []
    adopt_orphans = adopt_orphans and become_subreaper()
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in FORWARDED}
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)
    except BaseException:
        for s, h in previous.items():
            signal.signal(s, h)
        raise

    def forward(signum, frame):
        received.append({"signal": signal.Signals(signum).name, "time": time.time()})
        send_to_ranks(proc.pid, signum)

    for s in FORWARDED:
        signal.signal(s, forward)
    try:
        rc = proc.wait()
        if adopt_orphans:
            end_orphans()
    finally:
        for s in FORWARDED:  # never submitit's requeue handler again: the attempt is over
            signal.signal(s, signal.SIG_IGN)
    return rc, received


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``), best effort.

    torchrun starts each rank in a session of its own; if torchrun dies first, its ranks would be
    re-parented to init and escape SLURM's process tracking where it follows parentage
    (``proctrack/linuxproc``, common in containers), so a cancel would not reach them.
    """
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def end_orphans(grace_s: float = 30.0) -> list[int]:
    """Ranks left behind by a dead torchrun: SIGTERM (a graceful stop), SIGKILL after ``grace_s``."""
    import psutil

    left = psutil.Process().children(recursive=True)
    for p in left:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in left]


def send_to_ranks(agent_pid: int, signum: int) -> list[int]:
    """Send ``signum`` to the agent's children (the ranks; torchrun itself ignores it)."""
    import psutil

    sent = []
    try:
        children = psutil.Process(agent_pid).children()
    except psutil.Error:
        return sent
    for child in children:
        try:
            child.send_signal(signum)
            sent.append(child.pid)
        except psutil.Error:
            continue
    return sent


def first_node_address(hostnames: list[str], run=subprocess.run) -> str:
    """The c10d endpoint host: the first node's name if it resolves, else its SLURM ``NodeAddr``.

    Virtual or badly-named nodes do not resolve (``MASTER_ADDR=n1`` fails); ``scontrol show
    node`` knows the address SLURM itself uses for them.
    """
    name = hostnames[0]
    try:
        socket.getaddrinfo(name, None)
        return name
    except OSError:
        pass
    try:
        out = run(["scontrol", "--oneliner", "show", "node", name], capture_output=True, text=True, timeout=30)
        m = re.search(r"(?:^|\s)NodeAddr=(\S+)", out.stdout or "")
        if m:
            return m.group(1)
    except (OSError, subprocess.SubprocessError):
        pass
    fallback = os.environ.get("SLURM_LAUNCH_NODE_IPADDR")  # srun runs on the first node (the batch host)
    if fallback:
        return fallback
    raise RuntimeError(f"cannot find the address of node {name!r} (it does not resolve and scontrol "
                       "does not know it)")


if __name__ == "__main__":
    sys.exit(main())

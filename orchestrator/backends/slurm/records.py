"""An attempt's records on SLURM: the node launchers' records merged into the attempt directory.

Each node of a step writes its own records into ``attempts/<n>/nodes/<k>/`` (its launcher's
``node.json`` and ``agent.json``, rank errors, rank 0's status); once the step ended they are
merged into the attempt directory as ``agent.json`` (with the SLURM state's verdict),
``status.json``, ``error-rank<R>.json`` and ``final_model.json``, so the supervisor classifies a SLURM attempt
exactly like a local one.
"""
from __future__ import annotations

import time
from pathlib import Path

from ...plan import slurm as slurm_plan
from ...states import Failure
from ...worker import channel
from .states import JobInfo, lookup
from .submit import TRANSIENT_SUBMIT

SUBMIT_EXIT = 2             # exit status of an attempt whose submission (or launch) was refused


def nodes_ended(adir: Path, nnodes: int) -> bool:
    """Every node's launcher wrote its final record (the job is about to leave the queue)."""
    recs = [channel.read_json(p) for p in (adir / slurm_plan.NODES_DIR).glob(f"*/{slurm_plan.NODE_RECORD}")]
    return sum(1 for r in recs if r and "ended" in r) >= nnodes


def record_submit_failure(adir: Path, message: str) -> None:
    """A refused submission ends the attempt at once: a user error, unless SLURM was only busy."""
    transient = any(t in message.lower() for t in TRANSIENT_SUBMIT)
    verdict = Failure.WORKER_LOST if transient else Failure.USER_ERROR
    channel.write_json_atomic(adir / channel.error_file_name(0), {
        "rank": "sbatch", "type": "SlurmSubmitError", "message": message, "phase": "setup", "step": 0,
        "time": time.time()})
    channel.write_json_atomic(adir / channel.AGENT_RECORD_FILE, {
        "outcome": "submit_failed", "exit_code": SUBMIT_EXIT, "failures": {}, "scheduler_failure": verdict.value,
        "slurm": {"job_id": None, "state": None, "message": message}})


def publish(adir: Path, nnodes: int, info: JobInfo | None, launch_log: Path | None = None) -> int:
    """Merge the nodes' records into the attempt directory once its step ended; return its exit status.

    ``info``: SLURM's record of the step. ``launch_log``: where srun wrote why it could not launch.
    """
    agents: dict[int, dict] = {}
    for node in range(nnodes):
        ndir = adir / slurm_plan.NODES_DIR / str(node)
        agent = channel.read_json(ndir / channel.AGENT_RECORD_FILE)
        if agent:
            agents[node] = agent
        for src in sorted(ndir.glob(f"{channel.ERROR_FILE_PREFIX}*.json")) + [ndir / channel.STATUS_FILE,
                                                                              ndir / channel.FINAL_RECORD_FILE]:
            dst = adir / src.name
            if src.is_file() and not dst.exists():
                channel.write_json_atomic(dst, channel.read_json(src) or {})
    failures: dict = {}
    for agent in agents.values():
        failures.update(agent.get("failures") or {})
    rc = exit_status([a.get("exit_code") for a in agents.values()], nnodes - len(agents), info)
    row = lookup(info.state) if info else None
    verdict = row.verdict if row else None
    started = list((adir / slurm_plan.NODES_DIR).glob(f"*/{slurm_plan.NODE_RECORD}"))
    if info is not None and info.state == "FAILED" and not started:
        # The step failed before orchestrate's launcher ran on any node: the environment (python, setup
        # lines, a module missing on the nodes) is wrong; an identical retry would fail the same way.
        verdict = Failure.USER_ERROR
        log = launch_log
        tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log and log.is_file() else []
        channel.write_json_atomic(adir / channel.error_file_name(0), {
            "rank": "slurm", "type": "SlurmJobError", "phase": "setup", "step": 0, "time": time.time(),
            "message": f"SLURM job {info.job_id} failed before any node started training; {log}: "
                       + (" | ".join(tail) or "(empty)")})
    slurm = {"job_id": info.job_id if info else None, "state": info.state if info else None,
             "raw_state": info.raw_state if info else None, "reason": info.reason if info else None,
             "exit_code": info.exit_code if info else None, "meaning": row.meaning if row else "unknown to SLURM"}
    record = {"outcome": "succeeded" if rc == 0 else "failed", "exit_code": rc, "failures": failures,
              "nodes": {str(k): v for k, v in agents.items()}, "nodes_without_record": nnodes - len(agents),
              "slurm": slurm, "scheduler_failure": verdict.value if verdict else None}
    if not (adir / channel.AGENT_RECORD_FILE).exists():
        channel.write_json_atomic(adir / channel.AGENT_RECORD_FILE, record)
    job_rec = channel.read_json(adir / slurm_plan.JOB_RECORD) or {}
    channel.write_json_atomic(adir / slurm_plan.JOB_RECORD, {**job_rec, **slurm, "ended": time.time(),
                                                             "job_id": job_rec.get("job_id", slurm["job_id"])})
    return rc


def exit_status(codes: list, missing: int, info: JobInfo | None) -> int:
    """One exit status for the attempt: 0 if every node succeeded, 75 if they stopped gracefully,
    else the first failure (SLURM's exit code when no node left a record)."""
    codes = [c for c in codes if isinstance(c, int)]
    # A node ended by SIGTERM (128+15) was stopped because another failed: the other is the cause.
    bad = sorted((c for c in codes if c not in (0, channel.EXIT_STOPPED)), key=lambda c: c == 128 + 15)
    if bad:
        return bad[0]
    if channel.EXIT_STOPPED in codes:
        return channel.EXIT_STOPPED
    if codes and not missing:
        return 0
    if info is not None and info.exit_signal:
        return -info.exit_signal
    return info.exit_code if info is not None and info.exit_code else 1

"""What ``scontrol`` says about the allocation the supervisor runs in and its nodes.

``scontrol --oneliner show job|node`` prints ``Key=Value`` pairs; only the keys asked for are
read, and a node is usable only when SLURM says so (a node set DOWN, drained or not responding
is not). Commands run through an injected runner, so tests feed recorded output.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

from .submit import Runner, run_command

_PAIR = re.compile(r"(?:^|\s)([A-Za-z]+)=(\S*)")
BAD_NODE_STATES = ("DOWN", "DRAIN", "FAIL", "NOT_RESPONDING", "NO_RESPOND", "POWER", "REBOOT", "MAINT", "FUTURE")


def pairs(text: str) -> dict[str, str]:
    """``Key=Value`` pairs of one ``--oneliner`` record (a value is cut at its first space)."""
    return {k: v for k, v in _PAIR.findall(text or "")}


@dataclass(frozen=True)
class AllocationInfo:
    """The allocation as SLURM sees it now."""

    job_id: str
    state: str
    nodes: tuple[str, ...]
    end_time: float | None          # when the time limit ends it (epoch seconds), if known
    requeue: bool                   # the job may be requeued

    def time_left_s(self, now: float | None = None) -> float | None:
        return None if self.end_time is None else self.end_time - (time.time() if now is None else now)


def hostnames(nodelist: str, runner: Runner = run_command) -> list[str]:
    """``n[1-3],m1`` -> ``[n1, n2, n3, m1]``."""
    if not nodelist or nodelist in ("(null)", "None"):
        return []
    if "[" not in nodelist:
        return [h for h in nodelist.split(",") if h]
    rc, out, err = runner(["scontrol", "show", "hostnames", nodelist])
    if rc != 0:
        raise RuntimeError(f"scontrol show hostnames {nodelist}: {err.strip()}")
    return out.split()


def _epoch(value: str) -> float | None:
    try:
        return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, TypeError):
        return None


def allocation(job_id: str, runner: Runner = run_command) -> AllocationInfo | None:
    """The job as ``scontrol show job`` tells it (``None`` if SLURM does not know it)."""
    rc, out, _ = runner(["scontrol", "--oneliner", "show", "job", str(job_id)])
    if rc != 0 or "JobId=" not in out:
        return None
    p = pairs(out.splitlines()[0] if out else "")
    return AllocationInfo(job_id=str(job_id), state=p.get("JobState", ""), nodes=tuple(hostnames(p.get("NodeList", ""),
                                                                                              runner)),
                          end_time=_epoch(p.get("EndTime", "")), requeue=p.get("Requeue", "1") == "1")


def node_states(nodes: list[str], runner: Runner = run_command) -> dict[str, str]:
    """``{node: state}`` (e.g. ``IDLE``, ``MIXED``, ``DOWN*``, ``IDLE+DRAIN``); missing nodes are absent."""
    if not nodes:
        return {}
    rc, out, _ = runner(["scontrol", "--oneliner", "show", "node", ",".join(nodes)])
    states = {}
    for line in out.splitlines() if rc == 0 else []:
        p = pairs(line)
        if p.get("NodeName"):
            states[p["NodeName"]] = p.get("State", "")
    return states


def usable(state: str) -> bool:
    """A node state in which a step can run there."""
    return bool(state) and not any(bad in state.upper() for bad in BAD_NODE_STATES)

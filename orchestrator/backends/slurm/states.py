"""SLURM job states -> the project's JobState and Failure classes, in one table, plus
parsers of SLURM's structured output (``sbatch --parsable``, ``sacct --parsable2``,
``squeue -o``).

The parsers take only lines of the exact shape asked for: a login banner or a
``module`` message printed before the data (common on real login nodes) is skipped,
never mistaken for a job. Nothing here runs a command; the backend does, through an
injected runner, so tests feed recorded real output.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ...states import Failure, JobState


@dataclass(frozen=True)
class SlurmState:
    """What one SLURM state means here.

    ``active``: the attempt is still queued or running. ``job_state``: the job state it
    implies for the attempt. ``verdict``: a failure class only the scheduler can know
    (cancelled from outside, node failure, out of memory, time limit), which overrides
    what the worker's records say; ``None`` lets the worker's records decide
    (:func:`orchestrator.supervise.classify.classify`).
    """

    active: bool
    job_state: JobState
    verdict: Failure | None
    meaning: str


_A, _P, _R = True, JobState.PENDING, JobState.RUNNING
# The one table (sacct/squeue long state names; see `man sacct`, JOB STATE CODES).
SLURM_STATES: dict[str, SlurmState] = {
    "PENDING": SlurmState(_A, _P, None, "waiting in the queue"),
    "REQUEUED": SlurmState(_A, JobState.RESUMING, None, "requeued by SLURM (held back, then pending)"),
    "REQUEUE_HOLD": SlurmState(_A, JobState.RESUMING, None, "requeued and held"),
    "REQUEUE_FED": SlurmState(_A, JobState.RESUMING, None, "requeued by a federation"),
    "RESV_DEL_HOLD": SlurmState(_A, _P, None, "held: its reservation was deleted"),
    "CONFIGURING": SlurmState(_A, _R, None, "nodes allocated, booting"),
    "RUNNING": SlurmState(_A, _R, None, "running"),
    "COMPLETING": SlurmState(_A, _R, None, "processes ending, epilog running"),
    "STAGE_OUT": SlurmState(_A, _R, None, "staging out"),
    "SIGNALING": SlurmState(_A, _R, None, "being signalled"),
    "RESIZING": SlurmState(_A, _R, None, "changing size"),
    "SUSPENDED": SlurmState(_A, _R, None, "suspended (resumes by itself)"),
    "STOPPED": SlurmState(_A, _R, None, "stopped by SIGSTOP"),
    "COMPLETED": SlurmState(False, JobState.COMPLETED, None, "ended with exit code 0 on every node"),
    "FAILED": SlurmState(False, JobState.FAILED, None, "ended with a non-zero exit code"),
    "CANCELLED": SlurmState(False, JobState.CANCELLED, Failure.CANCELLED, "cancelled (scancel): the user's cancel"),
    "REVOKED": SlurmState(False, JobState.CANCELLED, Failure.CANCELLED, "revoked: a federation sibling started"),
    "TIMEOUT": SlurmState(False, JobState.RESUMING, Failure.PREEMPTED,
                          "time limit reached: resume from the last verified checkpoint"),
    "PREEMPTED": SlurmState(False, JobState.RESUMING, Failure.PREEMPTED, "preempted by a higher-priority job"),
    "NODE_FAIL": SlurmState(False, JobState.RESUMING, Failure.WORKER_LOST, "a node failed"),
    "BOOT_FAIL": SlurmState(False, JobState.RESUMING, Failure.WORKER_LOST, "a node failed to boot"),
    "LAUNCH_FAILED": SlurmState(False, JobState.RESUMING, Failure.WORKER_LOST, "the job could not be launched"),
    "OUT_OF_MEMORY": SlurmState(False, JobState.FAILED, Failure.OOM, "a process hit the memory limit"),
    "DEADLINE": SlurmState(False, JobState.FAILED, Failure.USER_ERROR, "its --deadline passed; not retried"),
    "SPECIAL_EXIT": SlurmState(False, JobState.FAILED, None, "special exit (held by the site's policy)"),
}
# Unknown (newer) states: treat as active if they look like one, else as a plain failure.
_UNKNOWN_ACTIVE = SlurmState(True, JobState.RUNNING, None, "unknown state (treated as still active)")
_UNKNOWN_ENDED = SlurmState(False, JobState.FAILED, None, "unknown terminal state")


def lookup(state: str) -> SlurmState:
    """The table row of a (possibly suffixed: ``CANCELLED by 0``, ``CANCELLED+``) state name."""
    base = normalize_state(state)
    if base in SLURM_STATES:
        return SLURM_STATES[base]
    return _UNKNOWN_ACTIVE if base.endswith(("ING", "HOLD")) else _UNKNOWN_ENDED


def normalize_state(state: str) -> str:
    """``CANCELLED by 1000`` -> ``CANCELLED``; ``CANCELLED+`` -> ``CANCELLED``; short codes stay short."""
    word = (state or "").strip().split(" ", 1)[0].rstrip("+").upper()
    return _SHORT.get(word, word)


_SHORT = {"PD": "PENDING", "R": "RUNNING", "CG": "COMPLETING", "CD": "COMPLETED", "F": "FAILED",
          "CA": "CANCELLED", "TO": "TIMEOUT", "PR": "PREEMPTED", "NF": "NODE_FAIL", "BF": "BOOT_FAIL",
          "OOM": "OUT_OF_MEMORY", "RQ": "REQUEUED", "CF": "CONFIGURING", "S": "SUSPENDED", "DL": "DEADLINE",
          "SE": "SPECIAL_EXIT", "ST": "STOPPED", "SO": "STAGE_OUT", "RV": "REVOKED", "RS": "RESIZING",
          "SI": "SIGNALING", "RH": "REQUEUE_HOLD", "RF": "REQUEUE_FED"}


@dataclass(frozen=True)
class JobInfo:
    """One job as SLURM reports it."""

    job_id: str
    state: str                       # normalised long name, e.g. CANCELLED
    raw_state: str = ""              # as printed, e.g. "CANCELLED by 0"
    exit_code: int | None = None     # sacct only: ExitCode "code:signal"
    exit_signal: int | None = None
    reason: str = ""
    nodes: str = ""
    source: str = ""                 # "squeue" or "sacct"

    @property
    def row(self) -> SlurmState:
        return lookup(self.state)

    @property
    def active(self) -> bool:
        return self.row.active


# ---- sbatch ------------------------------------------------------------------------------

_PARSABLE_ID = re.compile(r"^(\d+)(?:;[\w.-]+)?$")


def parse_sbatch_parsable(text: str) -> str:
    """The job id from ``sbatch --parsable`` output (``ID`` or ``ID;cluster``), banner lines skipped.

    Raises ValueError if no line has that shape.
    """
    ids = [m.group(1) for line in (text or "").splitlines() if (m := _PARSABLE_ID.match(line.strip()))]
    if not ids:
        raise ValueError(f"no job id in sbatch output: {text!r}")
    return ids[-1]


# ---- sacct / squeue ----------------------------------------------------------------------

SACCT_FIELDS = ("JobIDRaw", "State", "ExitCode", "Reason", "NodeList")
SQUEUE_FORMAT = "%i|%T|%r|%N"
_JOB_ID = re.compile(r"^\d+(?:_\d+)?$")


def sacct_argv(job_ids: list[str]) -> list[str]:
    """One batched ``sacct`` call for the allocations (not the steps) of ``job_ids``."""
    return ["sacct", "--parsable2", "--noheader", "--allocations", "--duplicates",
            "--format=" + ",".join(SACCT_FIELDS), "--jobs=" + ",".join(job_ids)]


def squeue_argv(job_ids: list[str]) -> list[str]:
    """One batched ``squeue`` call; ``--states=all`` keeps jobs that ended (for ``MinJobAge``)."""
    return ["squeue", "--noheader", "--states=all", "--format=" + SQUEUE_FORMAT, "--jobs=" + ",".join(job_ids)]


def parse_sacct(text: str) -> dict[str, JobInfo]:
    """``{job_id: JobInfo}`` from :func:`sacct_argv` output; with ``--duplicates`` the last record wins."""
    out: dict[str, JobInfo] = {}
    for line in (text or "").splitlines():
        parts = line.rstrip("\n").split("|")
        if len(parts) != len(SACCT_FIELDS) or not _JOB_ID.match(parts[0].strip()):
            continue  # banner, header, warning or a step line (123.batch)
        jid, state, code, reason, nodes = (p.strip() for p in parts)
        if not state:
            continue
        ec, sig = _exit_code(code)
        out[jid] = JobInfo(jid, normalize_state(state), state, ec, sig, reason, nodes, "sacct")
    return out


_STEP_ID = re.compile(r"^\d+(?:_\d+)?\.\d+$")


def sacct_step_argv(step_ids: list[str]) -> list[str]:
    """``sacct`` for job steps (``JOBID.STEPID``)."""
    return ["sacct", "--parsable2", "--noheader", "--format=" + ",".join(SACCT_FIELDS), "--jobs=" + ",".join(step_ids)]


def parse_sacct_steps(text: str) -> dict[str, JobInfo]:
    """``{"job.step": JobInfo}`` from :func:`sacct_step_argv` output (allocation and batch lines skipped)."""
    out: dict[str, JobInfo] = {}
    for line in (text or "").splitlines():
        parts = line.rstrip("\n").split("|")
        if len(parts) != len(SACCT_FIELDS) or not _STEP_ID.match(parts[0].strip()):
            continue
        sid, state, code, reason, nodes = (p.strip() for p in parts)
        if state:
            ec, sig = _exit_code(code)
            out[sid] = JobInfo(sid, normalize_state(state), state, ec, sig, reason, nodes, "sacct")
    return out


def parse_squeue(text: str) -> dict[str, JobInfo]:
    """``{job_id: JobInfo}`` from :func:`squeue_argv` output."""
    out: dict[str, JobInfo] = {}
    for line in (text or "").splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4 or not _JOB_ID.match(parts[0]) or not parts[1].strip():
            continue
        jid, state, reason, nodes = (p.strip() for p in parts)
        out[jid] = JobInfo(jid, normalize_state(state), state, None, None, reason, nodes, "squeue")
    return out


def _exit_code(text: str) -> tuple[int | None, int | None]:
    m = re.match(r"^(\d+):(\d+)$", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)

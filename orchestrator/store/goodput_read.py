"""Reading a job's records for its goodput account (:mod:`.goodput`): ledger, progress, attempt files.

What is read, all of it written by the job itself (nothing from logs):

* the ledger's job and attempt records (submit time, each attempt's start, end, world size and
  the step it resumed from);
* ``progress.jsonl``: ``start`` (``process_start``, ``restore_s``), ``log``, ``checkpoint``
  (``started``, ``save_s``), ``eval`` (``eval_s``) and ``end`` records, kept slim;
* per attempt: rank 0's last heartbeat (its last sign of life), ``final_check.json`` and each rank's
  ``steps-rank<R>.json`` (under ``nodes/<k>/`` on SLURM);
* ``slurm/allocations.jsonl``: when each allocation was submitted and started (queue wait).

:class:`GoodputReader` keeps its place in the progress file, so that a live view re-reads only what
was appended since its last frame. When a job ends, its supervisor keeps the final account in
``<run_dir>/goodput.json`` (:func:`write_final`): a cache of what the records say, so that a table of
a thousand finished jobs reads one small file per job instead of every progress file.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..states import JobState
from ..worker.channel import iter_jsonl, read_json, write_json_atomic
from ..worker.timing import STEPS_FILE_PREFIX
from .goodput import Account, AttemptFacts, JobFacts, account
from .paths import RunPaths
from .progress import read_heartbeat
from .records import Job

GOODPUT_FILE = "goodput.json"          # <run_dir>/goodput.json: the final account, written at the job's end
FINAL_CHECK_FILE = "final_check.json"   # attempts/<n>/final_check.json (the final-model check's record)
# The SLURM backend's allocation history (backends/slurm/allocation.py ALLOCATIONS, in plan/slurm.py's
# SUBMITIT_DIR); store/ may not import either, tests/test_goodput.py checks that the names agree.
ALLOCATIONS = ("slurm", "allocations.jsonl")
_KEEP = ("event", "attempt", "time", "step", "started", "save_s", "eval_s", "restore_s", "state", "world_size",
         "process_start")


def slim(rec: dict) -> dict:
    """The fields of a progress record the account uses."""
    return {k: rec[k] for k in _KEEP if k in rec}


def rank_steps(attempt_dir: Path) -> list[dict]:
    """Each rank's ``steps-rank<R>.json`` of an attempt (locally, or per node on SLURM), by rank."""
    found = {}
    for pattern in (f"{STEPS_FILE_PREFIX}*.json", f"nodes/*/{STEPS_FILE_PREFIX}*.json"):
        for path in sorted(Path(attempt_dir).glob(pattern)):
            rec = read_json(path)
            if isinstance(rec, dict) and isinstance(rec.get("rank"), int):
                found[rec["rank"]] = rec
    return [found[r] for r in sorted(found)]


def allocation_events(run_dir: Path) -> list[dict]:
    return [rec for rec, _ in iter_jsonl(Path(run_dir).joinpath(*ALLOCATIONS))]


def job_end(job: Job, now: float) -> float:
    """When the job ended (its last ledger write, which is its final state), or ``now``."""
    if not job.state.is_terminal:
        return now
    ended = [a.ended for a in job.attempts if a.ended is not None]
    return max([job.updated] + ended)


def _queued_now(job: Job, allocations: list[dict]) -> bool:
    """Waiting for an allocation: a SLURM job still pending, or one whose last allocation event is a
    submission that has not started yet (a requeue under the same SLURM job id leaves no event: waiting)."""
    if job.backend != "slurm" or job.state not in (JobState.PENDING, JobState.RESUMING):
        return False
    events = [e.get("event") for e in allocations]
    return not events or events[-1] in ("submitted", "resubmitted")


def _decode(lines: bytes) -> list:
    """JSON lines, decoded in one call (a long job has 100,000s); line by line if one is garbled."""
    body = lines.rstrip(b"\n").replace(b"\n", b",")
    try:
        return json.loads(b"[" + body + b"]")
    except ValueError:
        out = []
        for raw in lines.splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
        return out


class GoodputReader:
    """A job's records for :func:`~orchestrator.store.goodput.account`, read incrementally."""

    def __init__(self, run_dir: str | Path):
        self.paths = RunPaths(Path(run_dir))
        self.offset = 0
        self.records: dict[int, list[dict]] = {}

    def poll(self) -> None:
        """Read the records appended since the last call (whole lines only)."""
        try:
            with open(self.paths.progress, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n") + 1          # a last line without its newline is still being written
        if not end:
            return
        for rec in _decode(chunk[:end]):
            if isinstance(rec, dict) and isinstance(rec.get("attempt"), int):
                self.records.setdefault(rec["attempt"], []).append(slim(rec))
        self.offset += end

    def facts(self, job: Job, now: float | None = None) -> JobFacts:
        now = time.time() if now is None else now
        self.poll()
        allocations = allocation_events(self.paths.run_dir)
        attempts = []
        for a in job.attempts:
            adir = self.paths.attempt_dir(a.n)
            beat = read_heartbeat(adir) or {}
            check = read_json(adir / FINAL_CHECK_FILE)
            attempts.append(AttemptFacts(
                n=a.n, started=a.started, ended=a.ended, world_size=a.world_size, start_step=a.start_step,
                records=self.records.get(a.n, []), last_beat=beat.get("time"),
                final_check=check if isinstance(check, dict) else None, ranks=rank_steps(adir)))
        return JobFacts(created=job.created, end=job_end(job, now), state=job.state.value, attempts=attempts,
                        allocations=allocations, queued_now=_queued_now(job, allocations))

    def account(self, job: Job, now: float | None = None) -> Account:
        return account(self.facts(job, now))


def job_account(job: Job, now: float | None = None) -> Account:
    """One job's account, read from scratch."""
    return GoodputReader(job.run_dir).account(job, now)


def write_final(job: Job) -> dict:
    """Compute the ended ``job``'s account and keep it in ``goodput.json`` (keyed by the job's last update)."""
    data = job_account(job).to_json()
    write_json_atomic(Path(job.run_dir) / GOODPUT_FILE, {"job_updated": job.updated, "account": data})
    return data


def read_final(job: Job) -> dict | None:
    """The ended ``job``'s account from ``goodput.json``, if it was written since the job's last change."""
    if not job.state.is_terminal:
        return None
    data = read_json(Path(job.run_dir) / GOODPUT_FILE)
    if isinstance(data, dict) and isinstance(data.get("job_updated"), (int, float)) \
            and abs(data["job_updated"] - job.updated) < 1e-3 and isinstance(data.get("account"), dict):
        return data["account"]
    return None


def keep_final_goodput(ledger, job_id: str) -> None:
    """:func:`write_final` for a supervisor ending a job: nothing here may fail the job's end."""
    try:
        write_final(ledger.get(job_id))
    except Exception:  # noqa: BLE001 - a cache of what the records say: any view computes it again without it
        pass

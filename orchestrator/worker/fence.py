"""Whether this attempt may still act: the lease's fence and the run directory's stop request.

Both are files in the run directory, which every host sees, so they reach ranks that no signal
of the host reading them can reach (a supervisor on another login node, a successor that found
the ranks silent and cannot know whether they are dead or only paused).

* **Fence** (contract 2): the backend starts every rank with ``ORCHESTRATE_LEASE_GEN``, the lease
  generation that started the attempt. Once a newer generation exists that does not list the
  attempt in its ``continues`` (a successor that adopted the running attempt lists it), the
  attempt's supervisor has lost the job: rank 0 commits no checkpoint, deletes nothing, and every
  rank stops at its next step boundary. Without the variable (run by hand) there is no fence.
* **Stop request** (``requests/stop.json``, ``{"attempt": N, "reason": ...}``): every attempt
  numbered N or less stops at its next step boundary, writing nothing more.

Both are read by rank 0 only, at step boundaries (two small files); every rank then agrees.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import channel


def lease_generation(environ=None) -> int | None:
    """``$ORCHESTRATE_LEASE_GEN`` (``None``: no fence, e.g. a worker run by hand)."""
    env = os.environ if environ is None else environ
    value = (env.get(channel.ENV_LEASE_GEN) or "").strip()
    return int(value) if value.isdigit() else None


def _newest(lease_dir: Path) -> int:
    try:
        names = os.listdir(lease_dir)
    except OSError:
        return 0
    return max((int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()), default=0)


def fenced(run_dir: str | os.PathLike, attempt: int, environ=None) -> str | None:
    """Why this attempt is fenced (a newer lease generation that does not continue it), or ``None``."""
    mine = lease_generation(environ)
    if mine is None:
        return None
    lease_dir = Path(run_dir) / channel.LEASE_DIR
    newest = _newest(lease_dir)
    if newest <= mine:
        return None
    record = channel.read_json(lease_dir / channel.LEASE_FILE.format(gen=newest))
    if record is None:
        return None   # being replaced this instant (a renewal): the next step boundary looks again
    if attempt in (record.get("continues") or ()):
        return None
    owner = record.get("owner") or {}
    return (f"lease generation {newest} (pid {owner.get('pid')} on {owner.get('host')}) replaced generation {mine}, "
            f"which started attempt {attempt}")


def stop_requested(run_dir: str | os.PathLike, attempt: int) -> str | None:
    """The reason of a stop request that covers this attempt, or ``None``."""
    request = channel.read_json(Path(run_dir) / channel.REQUESTS_DIR / f"{channel.STOP_REQUEST}.json")
    if not isinstance(request, dict):
        return None
    try:
        covers = attempt <= int(request.get("attempt"))
    except (TypeError, ValueError):
        return None
    return str(request.get("reason") or "stop requested") if covers else None


def must_stop(run_dir: str | os.PathLike, attempt: int, environ=None) -> str | None:
    """Why this attempt must stop at once and write nothing more (fenced or asked to), or ``None``."""
    return stop_requested(run_dir, attempt) or fenced(run_dir, attempt, environ)


def halt(wenv, rank: int, step: int, why: str) -> None:
    """End this rank now, at a step boundary every rank agreed on, writing nothing but its end record.

    No checkpoint, no log record, no final model: the job belongs to somebody else now. Rank 0
    says so in ``status.json`` and ``progress.jsonl`` (the end record another host waits for);
    every rank exits ``EXIT_STOPPED`` at once, so torchrun ends the attempt as stopped.
    """
    import sys
    import time

    if rank == 0:
        try:
            channel.write_json_atomic(wenv.status, {"state": channel.WORKER_STOPPED, "attempt": wenv.attempt,
                                                    "step": step, "halted": why, "time": round(time.time(), 3)})
            channel.append_jsonl(wenv.progress, {"event": "end", "attempt": wenv.attempt, "time": round(time.time(), 3),
                                                 "step": step, "state": channel.WORKER_STOPPED, "halted": why})
        except OSError:
            pass
    print(f"[orchestrate] rank {rank}: stopping at step {step} without writing anything more: {why}",
          file=sys.stderr, flush=True)
    os._exit(channel.EXIT_STOPPED)

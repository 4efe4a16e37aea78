"""Whether this attempt may still act: the lease's fence and the run directory's stop request.

Both are files in the run directory, which every host sees, so they reach ranks that no signal
of the host reading them can reach (a supervisor on another login node, a successor that found
the ranks silent and cannot know whether they are dead or only paused).

* **Fence** (issue 17.3, contract 2): the backend starts every rank with ``ORCHESTRATE_LEASE_GEN``,
  the lease generation that started the attempt; the lease lives in ``$ORCHESTRATE_RUN_DIR/lease/``,
  one file per generation (``%08d.json``). Once a newer generation exists that does not list the
  attempt in its ``continues`` (a successor that adopted the running attempt lists it), the attempt's
  supervisor has lost the job: its ranks may still be training beside the new owner's, in the same
  ``output_dir``. Rank 0 then writes no checkpoint marker and deletes or rotates nothing (its save
  stays uncommitted: the new owner never resumes from it), and every rank stops at an agreed step
  boundary. Without the variable (run by hand) there is no fence.
* **Stop request** (``requests/stop.json``, ``{"attempt": N, "reason": ...}``): every attempt
  numbered N or less stops at its next agreed step boundary, writing nothing more.

Rank 0 reads both off the step path (the callback's request thread, once a second) and every rank
agrees through the step agreement; the commit path (:class:`Fence`) reads them again, exactly, before
every marker and every deletion.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import channel


class Fenced(RuntimeError):
    """A newer lease generation exists (or a stop was asked): this attempt may no longer write markers or delete."""


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


def _fenced_by(lease_dir: Path, mine: int | None, attempt: int | None) -> str | None:
    if mine is None:
        return None
    newest = _newest(lease_dir)
    if newest <= mine:
        return None
    record = channel.read_json(lease_dir / channel.LEASE_FILE.format(gen=newest))
    if record is None:
        return None   # being replaced this instant (a renewal): the next look decides
    if attempt is not None and attempt in (record.get("continues") or ()):
        return None   # adopted: the successor follows this attempt, its ranks go on
    owner = record.get("owner") or {}
    holder = f" (pid {owner.get('pid')} on {owner.get('host')})" if owner else ""
    started = f", which started attempt {attempt}" if attempt is not None else ""
    return (f"lease generation {newest} exists and this attempt runs under generation {mine}{started}: "
            f"another supervisor{holder} owns the job")


def fenced(run_dir: str | os.PathLike, attempt: int, environ=None) -> str | None:
    """Why this attempt is fenced (a newer lease generation that does not continue it), or ``None``."""
    return _fenced_by(Path(run_dir) / channel.LEASE_DIR, lease_generation(environ), attempt)


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


@dataclass(frozen=True)
class Fence:
    """The commit path's check: ``lease_dir``, the generation and the attempt (``None``: no fence)."""

    lease_dir: Path | None = None
    generation: int | None = None
    attempt: int | None = None

    @classmethod
    def from_environ(cls, environ=None) -> "Fence":
        """The fence the orchestrator set up for this attempt (none when the worker runs by hand).

        Raises ``ValueError`` naming the variable when ``$ORCHESTRATE_LEASE_GEN`` is not an integer.
        """
        env = os.environ if environ is None else environ
        raw = (env.get(channel.ENV_LEASE_GEN) or "").strip()
        run_dir = env.get(channel.ENV_RUN_DIR)
        attempt = (env.get(channel.ENV_ATTEMPT) or "").strip()
        attempt_n = int(attempt) if attempt.isdigit() else None
        if not raw:
            # no fence, but a stop request still reaches an attempt the orchestrator started
            return cls(Path(run_dir) / channel.LEASE_DIR, None, attempt_n) if run_dir and attempt_n is not None else cls()
        try:
            gen = int(raw)
        except ValueError:
            raise ValueError(f"{channel.ENV_LEASE_GEN}={raw!r}: expected the lease generation (an integer)") from None
        if not run_dir:
            raise ValueError(f"{channel.ENV_LEASE_GEN} is set but {channel.ENV_RUN_DIR} is not: the lease "
                             f"folder ({channel.ENV_RUN_DIR}/{channel.LEASE_DIR}) is unknown")
        return cls(Path(run_dir) / channel.LEASE_DIR, gen, attempt_n)

    def why(self) -> str | None:
        """Why this attempt may write nothing more (fenced or asked to stop), or ``None``."""
        if self.lease_dir is None:
            return None
        if self.attempt is not None:
            asked = stop_requested(self.lease_dir.parent, self.attempt)
            if asked:
                return f"a stop was requested ({asked})"
        return _fenced_by(self.lease_dir, self.generation, self.attempt)

    def check(self, what: str) -> None:
        """Raise :class:`Fenced` (saying that ``what`` was not done, and why) if fenced; log it to stderr."""
        why = self.why()
        if why is None:
            return
        message = f"[orchestrate] fenced: {what} not done; {why}"
        print(message, file=sys.stderr, flush=True)
        raise Fenced(message)


def halt(wenv, rank: int, step: int, why: str) -> None:
    """End this rank now, at a step boundary every rank agreed on, writing nothing but its end record.

    No checkpoint, no log record, no final model: the job belongs to somebody else now. Rank 0
    says so in ``status.json`` and ``progress.jsonl`` (the end record another host waits for);
    every rank exits ``EXIT_STOPPED`` at once, so torchrun ends the attempt as stopped.
    """
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

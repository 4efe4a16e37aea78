"""The worker side of the job's lease (issue 17.3, contract 2 in the team notes): a fenced rank 0 commits nothing.

The supervisor that starts an attempt holds the job's lease at some generation and passes it to
every rank as ``$ORCHESTRATE_LEASE_GEN``. The lease lives in ``$ORCHESTRATE_RUN_DIR/lease/``, one
file per generation (``%08d.json``). Once a file with a larger number exists, another supervisor
owns the job: this attempt's ranks are left over from a previous owner and may still be training
beside the new attempt, in the same ``output_dir``. Such a rank 0 writes no checkpoint marker and
deletes or rotates nothing; it says why on stderr, and its save stays uncommitted (the new owner
never resumes from it, and its own checkpoints are never touched).

Without ``$ORCHESTRATE_LEASE_GEN`` (a worker run by hand) there is no fence. Only file names are
read (one directory listing per check), so checking before every marker and every deletion is cheap.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import channel

LEASE_DIR = "lease"


class Fenced(RuntimeError):
    """A newer lease generation exists: this attempt may no longer write markers or delete anything."""


@dataclass(frozen=True)
class Fence:
    """``lease_dir`` and the generation this attempt was started under (``None``: no fence)."""

    lease_dir: Path | None = None
    generation: int | None = None

    @classmethod
    def from_environ(cls, environ=None) -> "Fence":
        """The fence the orchestrator set up for this attempt (none when the worker runs by hand).

        Raises ``ValueError`` naming the variable when ``$ORCHESTRATE_LEASE_GEN`` is not an integer.
        """
        env = os.environ if environ is None else environ
        raw = (env.get(channel.ENV_LEASE_GEN) or "").strip()
        if not raw:
            return cls()
        try:
            gen = int(raw)
        except ValueError:
            raise ValueError(f"{channel.ENV_LEASE_GEN}={raw!r}: expected the lease generation (an integer)") from None
        run_dir = env.get(channel.ENV_RUN_DIR)
        if not run_dir:
            raise ValueError(f"{channel.ENV_LEASE_GEN} is set but {channel.ENV_RUN_DIR} is not: the lease "
                             f"folder ({channel.ENV_RUN_DIR}/{LEASE_DIR}) is unknown")
        return cls(Path(run_dir) / LEASE_DIR, gen)

    def newest(self) -> int | None:
        """The largest generation in the lease folder (``None``: no fence, or the folder cannot be read)."""
        if self.lease_dir is None:
            return None
        try:
            names = os.listdir(self.lease_dir)
        except OSError:
            return None
        gens = [int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()]
        return max(gens, default=None)

    def why(self) -> str | None:
        """Why this attempt is fenced, or ``None`` when it is not."""
        newest = self.newest()
        if self.generation is None or newest is None or newest <= self.generation:
            return None
        return (f"lease generation {newest} exists and this attempt runs under generation {self.generation}: "
                f"another supervisor owns the job")

    def check(self, what: str) -> None:
        """Raise :class:`Fenced` (saying that ``what`` was not done, and why) if fenced; log it to stderr."""
        why = self.why()
        if why is None:
            return
        message = f"[orchestrate] fenced: {what} not done; {why}"
        print(message, file=sys.stderr, flush=True)
        raise Fenced(message)

"""Everything an attempt's directory says about how it ended, and the one line that tells why."""
from __future__ import annotations

from pathlib import Path

from ..store.logs import earliest_error_record
from ..worker import channel
from . import disk
from .classify import Outcome


def attempt_outcome(attempt_dir: Path, rc: int | None, *, stalled: bool = False, cancelled: bool = False,
                    output_dir: str | None = None) -> Outcome:
    """Everything the attempt directory says about how the attempt ended (and how full the disk is)."""
    status = channel.read_json(attempt_dir / channel.STATUS_FILE) or {}
    found = earliest_error_record(attempt_dir)
    low = bool(output_dir) and rc not in (0, None) and disk.disk_low(output_dir)
    return Outcome(returncode=rc, agent=channel.read_json(attempt_dir / channel.AGENT_RECORD_FILE),
                   worker_state=status.get("state"), error=found[0] if found else None,
                   stalled=stalled, cancelled=cancelled, disk_low=low)


def error_line(o: Outcome) -> str:
    """``rank 1 killed by SIGKILL``, or the first error record, or what the agent left."""
    for rank, f in sorted(((o.agent or {}).get("failures") or {}).items()):
        if f.get("signal") and f["signal"] != "SIGTERM":  # SIGTERM: torchrun ending the survivors
            return f"rank {rank} killed by {f['signal']}"
    if o.error:
        return f"rank {o.error.get('rank')}: {o.error.get('type')}: {str(o.error.get('message', ''))[:300]}"
    if o.agent is None and o.returncode not in (0, None):
        return f"torchrun agent ended with status {o.returncode} and left no record"
    return ""

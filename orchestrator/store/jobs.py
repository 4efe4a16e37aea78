"""Finding jobs: the ledger of an ``$ORCHESTRATE_HOME`` and a job by id or unique prefix."""
from __future__ import annotations

from pathlib import Path

from ..errors import JobError
from .ledger import Job, Ledger
from .paths import ENV_HOME, orchestrate_home
from .private import ensure_private_dir

MAX_LISTED = 20


def open_ledger(home: Path | None = None) -> Ledger:
    """The ledger of ``home`` (default: ``$ORCHESTRATE_HOME`` or ``~/.orchestrate``).

    The home and its ``runs/`` and ``index/`` are created 0700; one that another user owns, or that
    others may write, is refused (:class:`~orchestrator.store.private.NotPrivate`): only its owner steers.
    """
    home = Path(home or orchestrate_home())
    ensure_private_dir(home, f"{ENV_HOME} (the jobs' home)")
    for sub in ("runs", "index"):
        ensure_private_dir(home / sub, f"{ENV_HOME}'s folder")
    return Ledger.for_home(home)


def resolve_job(ledger: Ledger, ref: str) -> Job:
    """The one job whose id is ``ref`` or starts with it; :class:`JobError` if none or several."""
    ids = ledger.find(ref)
    if not ids:
        from .groups import groups_dir

        group_dir = groups_dir(ledger.runs.parent)
        if group_dir.is_dir() and any(p.name.startswith(ref) and p.suffix == ".json" for p in group_dir.iterdir()):
            raise JobError(f"'{ref}' is a sweep's group, not a job: orchestrate status --group {ref} "
                           f"(list, cancel: --group too)")
        raise JobError(f"no job '{ref}' in the ledger ({ledger.path})")
    if len(ids) > 1:   # issue 19: every match (a long list is cut, and says so), and what to type instead
        shown = ", ".join(ids[:MAX_LISTED]) + (f", ... ({len(ids) - MAX_LISTED} more: orchestrate list)"
                                               if len(ids) > MAX_LISTED else "")
        raise JobError(f"'{ref}' matches {len(ids)} jobs: {shown}; type more of the id")
    return ledger.get(ids[0])

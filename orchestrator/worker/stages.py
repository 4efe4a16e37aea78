"""The training stages of a user's script: which Trainer checkpoints where (issue 18.2).

A script may train more than once in a process, e.g. SFT then DPO. Each Trainer whose ``train()``
is called is a *stage*, numbered in the order of their first ``train()`` call (the same on every
rank and in every attempt, for a deterministic script). Each stage checkpoints into a folder of its
own: its ``args.output_dir``, or ``<that folder>/stage-<n>`` when an earlier stage of the script
already checkpoints there, so that two stages never share ``checkpoint-N`` names.

Rank 0 lists every stage it began in ``<run dir>/script_stages.json`` (written atomically)::

    {"stages": [{"stage": 1, "folder": "/abs/out", "trainer": "SFTTrainer", "attempt": 1}, ...]}

``attempt`` is the first attempt that began the stage. A later attempt resumes a stage from the
newest complete checkpoint of its folder only if the table says an earlier attempt of this job
began it there; a new stage's folder must hold no checkpoint (they would be someone else's). The
supervisor reads the same table to count a later stage's new checkpoints as progress and to move
its incomplete ones aside. Free of heavy imports (the supervisor reads it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import channel

STAGES_FILE = "script_stages.json"


@dataclass(frozen=True)
class StageEntry:
    """One stage as the table lists it."""

    stage: int
    folder: str
    trainer: str
    attempt: int


def read_stages(run_dir: str | Path) -> list[StageEntry]:
    """Every stage listed in ``run_dir``'s table, in order (empty if the script has not trained yet)."""
    data = channel.read_json(Path(run_dir) / STAGES_FILE) or {}
    out = []
    for item in data.get("stages") or []:
        try:
            out.append(StageEntry(int(item["stage"]), str(item["folder"]), str(item.get("trainer") or ""),
                                  int(item["attempt"])))
        except (KeyError, TypeError, ValueError):
            continue   # a hand-edited or foreign entry is not ours to trust
    return sorted(out, key=lambda e: e.stage)


def record_stage(run_dir: str | Path, entry: StageEntry) -> None:
    """Add ``entry`` to the table unless its stage is listed already (rank 0 only)."""
    known = read_stages(run_dir)
    if any(e.stage == entry.stage for e in known):
        return
    rows = [e.__dict__ for e in [*known, entry]]
    channel.write_json_atomic(Path(run_dir) / STAGES_FILE, {"stages": rows})


def stage_folder(output_dir: str | Path, stage: int, taken: list[Path]) -> Path:
    """Where stage ``stage`` checkpoints: its own ``output_dir`` unless an earlier stage already does."""
    folder = Path(output_dir).absolute()
    return folder / f"stage-{stage}" if folder in taken else folder


def extra_folders(run_dir: str | Path, output_dir: str | Path) -> list[Path]:
    """The checkpoint folders of a script's stages besides ``output_dir`` (the job's own), in stage order."""
    own = Path(output_dir).absolute()
    return [Path(e.folder) for e in read_stages(run_dir) if Path(e.folder) != own]

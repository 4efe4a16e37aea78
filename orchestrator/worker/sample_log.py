"""Test-only: which samples each optimizer step trained on (``$ORCHESTRATE_RECORD_SAMPLES=1``).

Resuming on another world size must keep the samples of every optimizer step (issue 12). With
this set, every micro-batch a rank trains on is recorded as one line of
``<attempt dir>/samples-rank<R>.jsonl``: the optimizer step it belongs to and a short hash of each
sample's tokens (padding left out), so runs with different ranks and accumulation can be compared.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

ENV_RECORD_SAMPLES = "ORCHESTRATE_RECORD_SAMPLES"


def sample_ids(inputs: dict, pad_id: int | None) -> list[str]:
    """A short hash of each row's tokens (padding and masked positions left out)."""
    ids = inputs["input_ids"].tolist()
    mask = inputs.get("attention_mask")
    mask = mask.tolist() if mask is not None else [[1] * len(r) for r in ids]
    out = []
    for row, m in zip(ids, mask):
        tokens = [t for t, keep in zip(row, m) if keep and t != pad_id]
        out.append(hashlib.sha1(json.dumps(tokens).encode()).hexdigest()[:12])
    return out


def install_sample_log(trainer, attempt_dir: str | os.PathLike, rank: int) -> bool:
    """Record each micro-batch's samples if the test asked for it; whether it did."""
    if os.environ.get(ENV_RECORD_SAMPLES) != "1":
        return False
    path = Path(attempt_dir) / f"samples-rank{rank}.jsonl"
    pad = getattr(getattr(trainer, "processing_class", None), "pad_token_id", None)
    step = trainer.training_step

    @functools.wraps(step)
    def recorded(model, inputs, *args, **kwargs):
        with open(path, "a") as f:
            f.write(json.dumps({"step": int(trainer.state.global_step) + 1, "rank": rank,
                                "samples": sample_ids(inputs, pad)}) + "\n")
        return step(model, inputs, *args, **kwargs)

    trainer.training_step = recorded
    return True

"""Every optimizer step takes the same samples on any number of ranks, epoch tails included (issue 16.4).

A job resumed on another world size keeps its global batch (``orchestrator/plan/resize.py``), and
in the middle of an epoch each optimizer step then takes the same samples: one permutation per
epoch, seeded by the epoch, cut into micro-batches that are spread over ranks and accumulation
steps. The epoch's last step is where layouts differ: when the rows are not a multiple of the
global batch, accelerate's ``even_batches`` fills the ranks' last batches with rows from the start
of the epoch (2 ranks: 16 samples), while one rank with gradient accumulation trains the short
remainder alone (8 samples). The loss, and every step after it, then depend on the layout.

:func:`pad_to_global_batch` makes the rows a multiple of the global batch before training by
repeating a few rows spread evenly over the data set (the same rows whatever the layout), so no
layout has a short or padded tail: every step of every epoch takes exactly ``global batch`` samples,
the same ones on 1 or N ranks. That is as many repeated samples per epoch as ``even_batches`` adds
on N ranks, only chosen the same way everywhere.
"""
from __future__ import annotations

import sys


def global_batch_of(args) -> int:
    """Samples per optimizer step over every rank: micro-batch x gradient accumulation x world size."""
    return int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * int(args.world_size)


def padded_indices(rows: int, multiple: int) -> list[int]:
    """``range(rows)`` and as many rows again, spread evenly, as make the length a multiple of ``multiple``."""
    extra = (-rows) % multiple
    return list(range(rows)) + [(i * rows) // extra for i in range(extra)]


def pad_to_global_batch(trainer, rank: int = 0) -> int:
    """Pad the trainer's train data set to a multiple of the global batch; the number of rows added.

    Leaves iterable data sets (no length) alone.
    """
    ds = trainer.train_dataset
    try:
        rows = len(ds)
    except TypeError:
        return 0
    multiple = global_batch_of(trainer.args)
    if rows == 0 or rows % multiple == 0:
        return 0
    indices = padded_indices(rows, multiple)
    if hasattr(ds, "select"):            # a datasets.Dataset (the Trainer removes unused columns from it)
        trainer.train_dataset = ds.select(indices)
    else:
        from torch.utils.data import Subset

        trainer.train_dataset = Subset(ds, indices)
    added = len(indices) - rows
    if rank == 0:
        print(f"[orchestrate] train data set: {rows} rows, {added} repeated to make {len(indices)}, a multiple of "
              f"the global batch ({multiple}): every optimizer step takes {multiple} samples on any number of "
              f"ranks, the epoch's last one too", file=sys.stderr, flush=True)
    return added

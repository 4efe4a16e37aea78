"""Sharded checkpoints written in the background, and their commit once every rank's write finished.

With FSDP2 and ``SHARDED_STATE_DICT`` each rank writes its own shard (DCP); nothing is gathered on
rank 0. The save is split in two: *staging* (on the training path: the model's and optimizer's
sharded state dicts are copied off the live tensors, DCP's ``DefaultStager``) and *persisting*
(``dcp.save`` of the staged copies on a background thread, over a process group of its own so
that its collectives never interleave with training's). The folder layout is accelerate's
(``pytorch_model_fsdp_0/``, ``optimizer_0/``), so transformers' own ``resume_from_checkpoint``
reads it as before.

A save is committed (:class:`Committer`) only when every rank's write has finished: the ranks
agree at a step boundary (an all-reduce while a save is pending), then rank 0 writes the
completion marker and rotates. At most one save is in flight (a new one waits for the
previous). A failure while persisting is a failed save: no marker, the previous complete
checkpoint stays the resume point. Each save records how long training was blocked and how
long the write took.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

MODEL_DIR = "pytorch_model_fsdp_0"      # accelerate's FSDP_MODEL_NAME + "_0"
OPTIMIZER_DIR = "optimizer_0"           # accelerate's OPTIMIZER_NAME + "_0"


@dataclass
class Save:
    """One checkpoint save: where, which step, when it began, how long training waited, the write."""

    path: str
    step: int
    started: float
    blocked_s: float = 0.0
    future: Future | None = None        # the background write (None: written synchronously)
    write_s: float | None = None
    extra: dict = field(default_factory=dict)


class AsyncWriter:
    """Stages sharded state dicts on the training path and persists them on one background thread."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orchestrate-ckpt")
        self._pg = None
        self._staged: list[tuple[str, dict]] = []
        self._lock = threading.Lock()

    def process_group(self):
        """A gloo group of its own for the background writes (created by every rank at the first save)."""
        import torch.distributed as dist

        if self._pg is None and dist.is_available() and dist.is_initialized():
            self._pg = dist.new_group(backend="gloo")
        return self._pg

    def stage(self, directory: str, state_dict: dict) -> None:
        """Copy ``state_dict`` off the live tensors now; write it to ``directory`` at :meth:`flush`."""
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        stager = DefaultStager(StagingOptions(False, False, False, False))
        try:
            staged = stager.stage(state_dict)
        finally:
            stager.close()
        os.makedirs(directory, exist_ok=True)
        self._staged.append((directory, staged))

    def flush(self, before_write: Callable[[], None] | None = None) -> Future:
        """Persist everything staged, in order, on the background thread; the future of the whole write.

        ``before_write`` runs on that thread first (the test-only save faults' ``write`` point).
        """
        items, self._staged = self._staged, []
        pg = self.process_group()
        return self._pool.submit(_persist, items, pg, before_write)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _persist(items: list[tuple[str, dict]], pg, before_write: Callable[[], None] | None = None) -> float:
    import torch.distributed.checkpoint as dcp

    t0 = time.time()
    if before_write is not None:
        before_write()
    for directory, state_dict in items:
        dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(directory), process_group=pg)
    return time.time() - t0


def sharded_async_enabled(trainer) -> bool:
    """The async path applies to FSDP2 with sharded state dicts on more than one rank."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return False
    plugin = trainer.accelerator.state.fsdp_plugin
    return (getattr(plugin, "fsdp_version", 1) == 2 and "SHARDED" in str(plugin.state_dict_type)
            and trainer.accelerator.num_processes > 1 and os.environ.get("ORCHESTRATE_ASYNC_SAVE", "1") != "0")


def install_async_fsdp_save(trainer, writer: AsyncWriter) -> None:
    """Route transformers' FSDP model/optimizer save through ``writer`` (staged now, written later)."""
    import transformers.trainer as tt

    def save_model(fsdp_plugin, accelerator, model, output_dir, **kwargs):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
        writer.stage(os.path.join(output_dir, MODEL_DIR), {"model": sd})

    def save_optimizer(fsdp_plugin, accelerator, optimizer, model, output_dir, **kwargs):
        from accelerate.utils.fsdp_utils import _unwrap_optimizer
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(model, _unwrap_optimizer(optimizer), options=StateDictOptions(full_state_dict=False))
        writer.stage(os.path.join(output_dir, OPTIMIZER_DIR), {"optimizer": osd})

    original = trainer._save_optimizer_and_scheduler

    def save_optimizer_and_scheduler(output_dir):
        saved = tt.save_fsdp_model, tt.save_fsdp_optimizer
        tt.save_fsdp_model, tt.save_fsdp_optimizer = save_model, save_optimizer
        try:
            return original(output_dir)
        finally:
            tt.save_fsdp_model, tt.save_fsdp_optimizer = saved

    trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler


class Committer:
    """Writes the completion marker of each save once every rank's part is on disk (see the module doc).

    ``agree_all(flag)``: True on every rank if ``flag`` is true on every rank (an all-reduce).
    ``commit(save, ok, error)``: rank 0's marker, rotation and record (or the failed save's record).
    """

    def __init__(self, agree_all: Callable[[bool], bool], commit: Callable[[Save, bool, str | None], None]):
        self.agree_all, self.commit = agree_all, commit
        self.pending: Save | None = None

    def saved(self, save: Save) -> None:
        """A save's synchronous part ended (every rank calls it); commit it now if it was written
        synchronously (once every rank is here), else when its background write is done."""
        if save.future is None:
            self.commit(save, self.agree_all(True), None)
        else:
            self.pending = save

    def poll(self, wait: bool = False) -> Save | None:
        """At a step boundary (every rank calls it): commit the pending save if every rank finished it.

        ``wait``: block until it has (before the next save, at the end of training, on a stop).
        """
        save = self.pending
        if save is None:
            return None
        if wait:
            _result(save.future)   # the wait blocks training: the next save (or the end) accounts for it
        if not self.agree_all(save.future.done()):
            return None
        write_s, error = _result(save.future)
        ok = self.agree_all(error is None)
        save.write_s = round(write_s, 3) if write_s is not None else None
        self.pending = None
        self.commit(save, ok, error)
        return save


def _result(future: Future) -> tuple[float | None, str | None]:
    try:
        return future.result(), None
    except Exception as exc:  # noqa: BLE001 - a failed write is a failed save, never a crash of training
        return None, f"{type(exc).__name__}: {exc}"

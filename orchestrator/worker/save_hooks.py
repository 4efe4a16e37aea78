"""Hooks on a Trainer's save and evaluation paths: phases, save timing, async writes, commit, test faults.

Installed on the trainer instance (no subclass, so any ``transformers.Trainer`` or TRL
trainer gets them): the heartbeat says ``saving`` while a save blocks training and
``evaluating`` during ``evaluate``; sharded FSDP2 saves are staged and written in the
background (:mod:`.async_save`); every save is committed (marker, rotation, record) only
once every rank's part is on disk; transformers' own rotation is turned off, because it
deletes old checkpoints before the new one is marked complete (the commit rotates:
:func:`orchestrator.worker.checkpoints.rotate_checkpoints`); and the test-only save faults
(:class:`orchestrator.worker.support.SaveFault`) fire at their points.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

from .async_save import AsyncWriter, Committer, Save, install_async_fsdp_save, sharded_async_enabled
from .heartbeat import Heartbeat
from .support import SaveFault


class SaveHooks:
    """What the worker knows about the save in progress (``started``: when it began, or ``None``)."""

    def __init__(self, trainer, heartbeat: Heartbeat, fault: SaveFault | None, rank: int, committer: Committer,
                 facts=lambda: {}):
        self.trainer, self.heartbeat, self.fault, self.rank = trainer, heartbeat, fault, rank
        self.committer, self.facts = committer, facts
        self.writer: AsyncWriter | None = None
        self.started: float | None = None
        self.step = 0
        self.extra: dict = {}      # what the next save's record says besides (why it was made)

    def install(self) -> "SaveHooks":
        t = self.trainer
        if sharded_async_enabled(t):
            self.writer = AsyncWriter()
            install_async_fsdp_save(t, self.writer)
        t._save_checkpoint = self._committed(self._without_rotation(self._wrap(t._save_checkpoint, before="start")))
        t.save_model = self._wrap(t.save_model, after="model")
        t._save_optimizer_and_scheduler = self._wrap(t._save_optimizer_and_scheduler, after="optimizer")
        t._save_rng_state = self._wrap(t._save_rng_state, after="rng")
        t._rotate_checkpoints = lambda *args, **kwargs: None   # transformers 4's rotation; ours runs after the marker
        evaluate = t.evaluate

        @functools.wraps(evaluate)
        def evaluate_with_phase(*args, **kwargs):
            previous = self.heartbeat.phase_name
            self.heartbeat.phase("evaluating")
            try:
                return evaluate(*args, **kwargs)
            finally:
                self.heartbeat.phase(previous)
        t.evaluate = evaluate_with_phase
        return self

    def _without_rotation(self, save_checkpoint):
        """transformers 5 rotates inside ``_save_checkpoint`` by ``args.save_total_limit``: hide it meanwhile."""
        @functools.wraps(save_checkpoint)
        def wrapped(*args, **kwargs):
            limit = self.trainer.args.save_total_limit
            self.trainer.args.save_total_limit = None
            try:
                return save_checkpoint(*args, **kwargs)
            finally:
                self.trainer.args.save_total_limit = limit
        return wrapped

    def _committed(self, save_checkpoint):
        """One save: wait for the one in flight, write (or stage and hand to the writer), then commit."""
        @functools.wraps(save_checkpoint)
        def wrapped(*args, **kwargs):
            self.started, self.step = time.time(), int(self.trainer.state.global_step)
            self.heartbeat.phase("saving", self.step)
            self.extra = {**self.extra, **self.facts()}
            self.committer.poll(wait=True)     # at most one save in flight
            save_checkpoint(*args, **kwargs)
            step = self.step
            future = self.writer.flush(lambda: self.point("write", step)) if self.writer is not None else None
            path = Path(self.trainer.args.output_dir) / f"checkpoint-{self.step}"
            save = Save(str(path), self.step, self.started, round(time.time() - self.started, 3), future,
                        extra=self.extra)
            self.extra = {}
            self.committer.saved(save)
            self.started = None
            self.heartbeat.phase("training")
        return wrapped

    def _wrap(self, fn, before: str | None = None, after: str | None = None):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if self.started is not None and before:
                self.point(before)
            out = fn(*args, **kwargs)
            if self.started is not None and after:   # save_model is also called outside checkpoints
                self.point(after)
            return out
        return wrapped

    def point(self, name: str, step: int | None = None) -> None:
        """A point of the save in progress (where a test fault may fire)."""
        if self.fault is not None:
            self.fault.fire(self.rank, self.step if step is None else step, name)

    def close(self) -> None:
        """Wait for and commit the save in flight (end of training, a stop), then end the writer."""
        self.committer.poll(wait=True)
        if self.writer is not None:
            self.writer.close()

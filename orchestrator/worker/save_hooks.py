"""Hooks on a Trainer's save and evaluation paths: phases, save timing, safe rotation, test faults.

Installed on the trainer instance (no subclass, so any ``transformers.Trainer`` or TRL
trainer gets them): the heartbeat says ``saving`` from the first byte of a checkpoint to its
completion marker and ``evaluating`` during ``evaluate``; the time training was blocked by
each save is measured; transformers' own rotation is turned off, because it deletes old
checkpoints before the new one is marked complete (the worker rotates after the marker:
:func:`orchestrator.worker.checkpoints.rotate_checkpoints`); and the test-only save faults
(:class:`orchestrator.worker.support.SaveFault`) fire at their points.
"""
from __future__ import annotations

import functools
import time

from .heartbeat import Heartbeat
from .support import SaveFault


class SaveHooks:
    """What the worker knows about the save in progress (``started``: when it began, or ``None``)."""

    def __init__(self, trainer, heartbeat: Heartbeat, fault: SaveFault | None, rank: int):
        self.trainer, self.heartbeat, self.fault, self.rank = trainer, heartbeat, fault, rank
        self.started: float | None = None
        self.step = 0

    def install(self) -> "SaveHooks":
        t = self.trainer
        t._save_checkpoint = self._without_rotation(self._wrap(t._save_checkpoint, before="start", phase="saving"))
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

    def _wrap(self, fn, before: str | None = None, after: str | None = None, phase: str | None = None):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if phase is not None:
                self.started, self.step = time.time(), int(self.trainer.state.global_step)
                self.heartbeat.phase(phase, self.step)
            if self.started is not None and before:
                self.point(before)
            out = fn(*args, **kwargs)
            if self.started is not None and after:   # save_model is also called outside checkpoints
                self.point(after)
            return out
        return wrapped

    def point(self, name: str) -> None:
        """A point of the save in progress (where a test fault may fire)."""
        if self.fault is not None:
            self.fault.fire(self.rank, self.step, name)

    def finished(self) -> float:
        """The save is complete (marker written, rotation done): back to training; returns the blocked seconds."""
        blocked = time.time() - self.started if self.started is not None else 0.0
        self.started = None
        self.heartbeat.phase("training")
        return round(blocked, 3)

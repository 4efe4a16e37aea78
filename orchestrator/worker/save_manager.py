"""The one owner of a Trainer's checkpoints: staging, writing, committing, purging, and the best model.

Shaped after torchtitan's ``CheckpointManager`` (``torchtitan/components/checkpoint.py``): a save
waits for the previous one, writes or stages the state on the training path, and hands the rest
(the background write, the commit, the purge) to a thread of its own; nothing on the training path
waits for a commit or a purge. What it takes from transformers:

* ``Trainer._save_checkpoint(model, trial)`` is the one private method relied on: the training loop
  calls it when a save is due, and :meth:`SaveManager.save_checkpoint` takes its place on the
  instance. The folder is written in transformers' layout (:mod:`.layout`), so its own
  ``resume_from_checkpoint`` and ``load_best_model_at_end`` read it; :func:`missing_trainer_hooks`
  says what an installed transformers lacks (contract 4 in the team notes).
* ``save_total_limit`` is handed over once, at :meth:`SaveManager.install`: the manager keeps the
  limit and sets ``args.save_total_limit`` to ``None``, so transformers itself never deletes a
  checkpoint (it would, before the new one is complete, and at the end of training with
  ``load_best_model_at_end``); the manager rotates after each commit (:func:`.checkpoints.rotate_checkpoints`:
  the newest ``limit`` complete checkpoints and the best one are kept).

The best model (issue 16.3): ``state.best_model_checkpoint`` is set when the best step's folder is
saved (transformers only sets it once that folder exists, which a sharded save has not created yet at
that point, so it stayed ``None``), reverted if that save fails, never rotated away, and a save at the
end of training (or the end itself, :meth:`settle`) waits for the commit, so that transformers loads
the best checkpoint only once it is complete.
"""
from __future__ import annotations

import errno
import inspect
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

from .async_save import Stager, sharded_async_enabled
from .checkpoints import rotate_checkpoints
from .collectives import GroupCollectives, side_groups
from .commit import Committer, Outcome, Save
from .fence import Fence
from .heartbeat import Heartbeat
from .layout import own_layout_unsupported, write_parts
from .support import SaveFault


def missing_trainer_hooks(trainer_or_class) -> list[str]:
    """The private transformers attributes the save manager relies on that this Trainer lacks ([] = compatible)."""
    cls = trainer_or_class if isinstance(trainer_or_class, type) else type(trainer_or_class)
    missing = []
    save = getattr(cls, "_save_checkpoint", None)
    params = list(inspect.signature(save).parameters)[1:] if callable(save) else []
    if params[:2] != ["model", "trial"]:
        missing.append("Trainer._save_checkpoint(self, model, trial)")
    from transformers import TrainerState

    if "best_global_step" not in getattr(TrainerState, "__dataclass_fields__", {}):
        missing.append("TrainerState.best_global_step")
    return missing


class Background:
    """One daemon thread running jobs in order (a ``ThreadPoolExecutor`` thread would be joined at interpreter
    exit: a rank failing while its background job waits in a collective for a dead rank would never exit)."""

    def __init__(self, name: str):
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the future
                future.set_exception(exc)

    def shutdown(self) -> None:
        self._jobs.put(None)
        self._thread.join()


class SaveManager:
    """Owns every save of one Trainer (see the module doc).

    ``record(event, step, **fields)`` writes progress records (rank 0's callback); ``describe()`` gives
    the marker's facts when a save starts (and restarts the timed-save clock); ``fault`` is the
    test-only :class:`~.support.SaveFault`.
    """

    def __init__(self, trainer, heartbeat: Heartbeat, fault: SaveFault | None, rank: int,
                 record: Callable[..., None], describe: Callable[[], tuple[dict, dict]], fence: Fence | None = None):
        self.trainer, self.heartbeat, self.fault, self.rank = trainer, heartbeat, fault, rank
        self.record, self.describe, self.fence = record, describe, fence or Fence.from_environ()
        self.limit: int | None = None
        self.sharded_async = False
        self._original = None               # transformers' own _save_checkpoint (for what layout.py does not cover)
        self._pool: Background | None = None
        self._committer: Committer | None = None
        self.pending: Future | None = None
        self.pending_save: Save | None = None
        self._best_before: tuple[str, str | None] | None = None   # (save path, best_model_checkpoint before it)
        self.last: Outcome | None = None

    # -- setup -------------------------------------------------------------------------------------
    def install(self) -> "SaveManager":
        """Take over the trainer's saves and its ``save_total_limit``."""
        import transformers

        t = self.trainer
        missing = missing_trainer_hooks(t)
        if missing:
            raise RuntimeError(f"transformers {transformers.__version__} lacks what orchestrate's save path relies "
                               f"on: {', '.join(missing)}; install a transformers version within the range "
                               f"pyproject.toml names")
        self.limit, t.args.save_total_limit = t.args.save_total_limit, None
        self._original = t._save_checkpoint
        t._save_checkpoint = self.save_checkpoint
        self.sharded_async = sharded_async_enabled(t)
        return self

    def start(self) -> None:
        """The background thread and its process group (every rank at the same point: at ``on_train_begin``)."""
        if self._pool is not None:
            return
        _control, writer = side_groups()
        args = self.trainer.args
        self._committer = Committer(self.rank, int(args.world_size), writer, GroupCollectives(writer), self.fence,
                                    self.point, self._recorded, self._failed, self._rotate)
        self._pool = Background("orchestrate-ckpt")

    # -- the save (transformers calls it when a save is due) ---------------------------------------------
    def save_checkpoint(self, model=None, trial=None) -> None:
        """One save: wait for the previous commit, write or stage every part, hand the rest to the thread."""
        t, state = self.trainer, self.trainer.state
        started, step = time.time(), int(state.global_step)
        self.heartbeat.phase("saving", step)
        self.settle()                                # at most one save in flight
        self.start()
        path = Path(t.args.output_dir) / f"checkpoint-{step}"
        self.point("start", step)
        marker, why = self.describe()
        path.mkdir(parents=True, exist_ok=True)
        self._track_best(path)
        stager = Stager() if self.sharded_async else None
        if own_layout_unsupported(t, trial):
            self._original(model, trial)             # rotates nothing: save_total_limit was handed over
        else:
            write_parts(t, str(path), stager, lambda name: self.point(name, step))
        staged = stager.take() if stager is not None else []
        save = Save(str(path), step, started, round(time.time() - started, 3), staged=staged, marker=marker, why=why,
                    async_write=bool(staged), expect_rng=not t.args.save_only_model)
        self.pending_save, self.pending = save, self._pool.submit(self._committer.run, save)
        if state.global_step >= state.max_steps or t.control.should_training_stop:
            self.settle()                            # the end: transformers may load the best model next
        self.heartbeat.phase("training")

    def _track_best(self, path: Path) -> None:
        """Point ``best_model_checkpoint`` at the best step's folder once it is being saved (transformers'
        own test, "the folder exists", comes before a sharded save creates it)."""
        state = self.trainer.state
        best_step = getattr(state, "best_global_step", None)
        if not best_step:
            return
        best = Path(self.trainer.args.output_dir) / f"checkpoint-{best_step}"
        if best_step == state.global_step or best.is_dir():
            self._best_before = (str(path), state.best_model_checkpoint)
            state.best_model_checkpoint = str(best)

    # -- the background job's outcome, seen from the training path ------------------------------------------
    def poll(self, wait: bool = False) -> Outcome | None:
        """The finished save's outcome, once (``wait``: wait for it). No collective: every rank polls locally.

        A failed save is only a record (the previous complete checkpoint stays the resume point), except
        on a full disk: then this rank raises ENOSPC, which ends the attempt as DISK_FULL.
        """
        if self.pending is None or (not wait and not self.pending.done()):
            return None
        outcome, save = self.pending.result(), self.pending_save
        self.pending, self.pending_save, self.last = None, None, outcome
        if not outcome.ok and self._best_before and self._best_before[0] == save.path:
            self.trainer.state.best_model_checkpoint = self._best_before[1]   # the best save failed: the one before
        if outcome.error and ("No space left on device" in outcome.error or "Errno 28" in outcome.error):
            raise OSError(errno.ENOSPC, f"No space left on device (saving {save.path}): {outcome.error}")
        return outcome

    def settle(self) -> Outcome | None:
        """Wait until the save in flight is written and committed (before the next save, at the end)."""
        return self.poll(wait=True)

    def close(self) -> None:
        """Settle the save in flight, then end the background thread."""
        try:
            self.settle()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool, self._committer = None, None

    # -- on the background thread (rank 0) ----------------------------------------------------------------
    def _recorded(self, save: Save, outcome: Outcome) -> None:
        self.record("checkpoint", save.step, path=str(Path(save.path).absolute()), save_s=save.blocked_s,
                    write_s=save.write_s, async_write=save.async_write, started=round(save.started, 3),
                    files=len(outcome.files), **save.why)

    def _failed(self, save: Save, outcome: Outcome) -> None:
        self.record("checkpoint_failed", save.step, path=save.path, save_s=save.blocked_s,
                    error=outcome.error or "unknown", **save.why)

    def _rotate(self, save: Save) -> None:
        best = self.trainer.state.best_model_checkpoint

        def before_delete(folder: Path) -> None:
            self.fence.check(f"deleting {folder.name}")
            self.point("rotate", save.step)
        rotate_checkpoints(self.trainer.args.output_dir, self.limit, keep=(best,) if best else (),
                           before_delete=before_delete)

    def point(self, name: str, step: int) -> None:
        """A point of a save (where a test fault may fire)."""
        if self.fault is not None:
            self.fault.fire(self.rank, step, name)

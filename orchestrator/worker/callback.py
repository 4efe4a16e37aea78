"""What every supervised Trainer gets, from ``train_worker.py`` or around a user's own script.

:class:`OrchestrateCallback` writes the progress records, keeps the heartbeat's phase, stops every
rank at a step boundary on a stop signal (with a checkpoint), saves when the time interval passed
or a ``orchestrate checkpoint`` request came, commits each checkpoint once every rank's part is
on disk (marker, rotation, record with blocked and write times), and fires the test-only faults.
:class:`WorkerRun` keeps this process's final records (``status.json``, ``error-rank<R>.json``).
:func:`attach` puts both on a trainer.
"""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from transformers import TrainerCallback

from . import channel
from .async_save import Committer, Save
from .checkpoints import latest_complete_checkpoint, rotate_checkpoints, write_checkpoint_marker
from .collectives import agree_all, agree_any, distributed_info, gpu_memory
from .fence import halt, must_stop
from .heartbeat import Heartbeat
from .sample_log import install_sample_log
from .save_hooks import SaveHooks
from .support import SaveFault, StopFlag, WorkerEnv, env_rank, env_world_size, maybe_inject_fault, write_error
from .timing import RestoreTimer, StepClock, eval_fields


def _process_start() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - only the "wall" field depends on it
        return time.time()


T0 = _process_start()   # for the "wall" field: seconds since this rank's process started


def now() -> float:
    return round(time.time(), 3)


class OrchestrateCallback(TrainerCallback):
    """Progress records, phases, graceful stop, timed and requested saves, commits, test faults."""

    def __init__(self, wenv: WorkerEnv, stop: StopFlag, resumed_from: str | None, tokens_base: int, fault):
        self.wenv, self.stop, self.resumed_from, self.fault = wenv, stop, resumed_from, fault
        self.rank = env_rank()
        self.trainer = None  # set by attach()
        self.info: dict = {}
        self.optimizer_steps = 0  # in this attempt; 0 means "still in setup"
        self.stopped = False
        self.t_begin, self.tokens_begin = time.time(), tokens_base
        self.heartbeat: Heartbeat | None = None
        self.hooks: SaveHooks | None = None
        self.every_s = float(os.environ.get(channel.ENV_SAVE_EVERY_S) or 0)
        self.last_save = time.monotonic()
        self.handled_request = 0.0
        self.restore, self.steps = RestoreTimer(), StepClock(wenv.attempt_dir, self.rank)   # goodput (issue 20)

    def _record(self, event: str, step: int, **fields) -> None:
        if self.rank == 0 and not must_stop(self.wenv.progress.parent, self.wenv.attempt):   # fenced: writes nothing
            channel.append_jsonl(self.wenv.progress, {
                "event": event, "attempt": self.wenv.attempt, "time": now(), "step": step, **fields})

    def _tokens(self) -> int:
        return int(getattr(self.trainer, "_total_train_tokens", 0) or 0)

    def _device(self):
        return self.trainer.accelerator.device

    # -- the trainer's events ----------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        # The model is wrapped (accelerator.prepare) before on_train_begin, so this is what really runs.
        self.info = distributed_info(self.trainer)
        self.t_begin, self.tokens_begin = time.time(), self._tokens()
        self.heartbeat.phase("training", state.global_step)
        self._record("start", state.global_step, max_steps=state.max_steps, num_train_epochs=state.num_train_epochs,
                     resumed_from=self.resumed_from, world_size=self.info["world_size"],
                     distributed_type=self.info["distributed_type"], fsdp_version=self.info["fsdp_version"],
                     fsdp_wrapped=self.info["fsdp_wrapped"], global_batch=global_batch(args),
                     process_start=round(T0, 3), **self.restore.fields(bool(self.resumed_from)))

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps.begin(state.global_step + 1)
        maybe_inject_fault(self.fault, self.rank, state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        self.optimizer_steps += 1
        self.steps.end()
        self.heartbeat.step = state.global_step
        why = must_stop(self.wenv.progress.parent, self.wenv.attempt) if self.rank == 0 else None
        if agree_any(why is not None, self._device()):   # fenced, or another host asked: write nothing more
            halt(self.wenv, self.rank, state.global_step, why or "rank 0 was told to stop")
        self.hooks.committer.poll()          # a background write that every rank finished: commit it
        if agree_any(bool(self.stop), self._device()):
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        elif agree_any(self.rank == 0 and self._save_due(), self._device()):
            control.should_save = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.hooks.close()                   # the save in flight is complete and committed before we leave
        self.steps.write()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        hb = self.heartbeat   # its "evaluating" phase began when evaluate() did (save_hooks.py)
        self._record("eval", state.global_step,
                     **eval_fields(metrics, state.epoch, hb.phase_name, hb.since, time.time()))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:  # eval and the final summary have no training loss
            return
        tokens = int(logs.get("num_tokens", self._tokens()))
        elapsed = max(time.time() - self.t_begin, 1e-9)
        self._record("log", state.global_step, max_steps=state.max_steps, loss=float(logs["loss"]),
                     learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"), tokens=tokens,
                     tokens_per_s=round((tokens - self.tokens_begin) / elapsed, 2), epoch=logs.get("epoch"),
                     wall=round(time.time() - T0, 3), **gpu_memory())

    # -- saves ----------------------------------------------------------------------------------
    def _save_due(self) -> bool:
        """Rank 0: the time interval passed, or ``orchestrate checkpoint`` asked (the reason goes on the save)."""
        request = channel.read_json(Path(self.wenv.progress).parent / channel.REQUESTS_DIR /
                                    f"{channel.CHECKPOINT_REQUEST}.json") or {}
        asked = float(request.get("time") or 0)
        if asked > self.handled_request:
            self.handled_request = asked
            self.hooks.extra = {"reason": "requested", "requested": asked}
            return True
        if self.every_s and time.monotonic() - self.last_save >= self.every_s:
            self.hooks.extra = {"reason": "time"}
            return True
        return False

    def facts(self) -> dict:
        """Taken when a save starts: what its marker and record say besides."""
        self.last_save = time.monotonic()
        return {"tokens": self._tokens()}

    def commit(self, save: Save, ok: bool, error: str | None) -> None:
        """Every rank's part of ``save`` is on disk (or one failed): rank 0 marks, rotates and records it.

        A failed write is a failed save (no marker; the previous complete checkpoint stays the resume
        point) and training goes on, except on a full disk: that rank raises ENOSPC, which ends the
        attempt as DISK_FULL (the supervisor moves the incomplete checkpoint aside and says so).
        """
        self.hooks.point("marker", save.step)
        why = {k: v for k, v in save.extra.items() if k in ("reason", "requested")}
        if not ok and self.rank == 0:
            self._record("checkpoint_failed", save.step, path=save.path, save_s=save.blocked_s,
                         error=error or "another rank's write failed", **why)
        if error and ("No space left on device" in error or "Errno 28" in error):
            raise OSError(errno.ENOSPC, f"No space left on device (writing {save.path} in the background): {error}")
        if not ok or self.rank != 0:
            return
        if must_stop(self.wenv.progress.parent, self.wenv.attempt):   # contract 2: a fenced rank 0 commits nothing
            return
        args = self.trainer.args
        gb = global_batch(args)
        write_checkpoint_marker(save.path, save.step, attempt=self.wenv.attempt, world_size=args.world_size,
                                global_batch=gb, samples=save.step * gb, **save.extra)
        # save_total_limit only now that the new checkpoint is complete (see worker/save_hooks.py)
        best = self.trainer.state.best_model_checkpoint
        rotate_checkpoints(args.output_dir, args.save_total_limit, keep=(best,) if best else (),
                           before_delete=lambda _: self.hooks.point("rotate", save.step))
        self._record("checkpoint", save.step, path=str(Path(save.path).absolute()), save_s=save.blocked_s,
                     write_s=save.write_s, async_write=save.future is not None,
                     started=round(save.started, 3), **why)


def global_batch(args) -> int:
    """Samples per optimizer step over every rank: micro-batch x gradient accumulation x world size."""
    return int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * int(args.world_size)


def attach(trainer, callback: OrchestrateCallback, heartbeat: Heartbeat) -> SaveHooks:
    """Put the callback and the save hooks on ``trainer`` (any transformers/TRL Trainer)."""
    callback.trainer, callback.heartbeat = trainer, heartbeat
    callback.restore.install(trainer)
    if callback not in trainer.callback_handler.callbacks:
        trainer.add_callback(callback)
    committer = Committer(lambda flag: agree_all(flag, trainer.accelerator.device), callback.commit)
    fault = SaveFault.parse(os.environ.get(channel.ENV_SAVE_FAULT), callback.wenv.attempt)
    callback.hooks = SaveHooks(trainer, heartbeat, fault, env_rank(), committer, callback.facts).install()
    install_sample_log(trainer, callback.wenv.attempt_dir, env_rank())   # test-only, off unless asked
    return callback.hooks


class WorkerRun:
    """This process's bookkeeping for its attempt's final records (status.json, error-rank<R>.json).

    Not the ledger's :class:`~orchestrator.store.records.AttemptRecord`: that is the
    orchestrator's record of the whole attempt; this lives and dies with one rank.
    """

    def __init__(self):
        self.rank = env_rank()
        self.wenv: WorkerEnv | None = None
        self.trainer = None
        self.callback: OrchestrateCallback | None = None
        self.training_args = None
        self.fast_exit = False   # no reporting integration waits on atexit hooks (see train_worker._exit)
        self.resume_step = 0     # global step of the checkpoint this attempt resumes from

    @property
    def step(self) -> int:
        step = int(self.trainer.state.global_step) if self.trainer is not None else 0
        return step or self.resume_step  # before train() loads the checkpoint's state

    @property
    def max_steps(self) -> int | None:
        steps = self.trainer.state.max_steps if self.trainer is not None else 0
        return steps or (self.training_args.max_steps if self.training_args else 0) or None

    def write_status(self, state: str, final_model: str | None = None, **extra) -> None:
        if self.rank != 0 or self.wenv is None:
            return
        info = self.callback.info if self.callback and self.callback.info else {}
        out = self.training_args.output_dir if self.training_args else None
        last = latest_complete_checkpoint(out) if out else None
        channel.write_json_atomic(self.wenv.status, {
            "state": state, "attempt": self.wenv.attempt, "step": self.step, "max_steps": self.max_steps,
            "distributed_type": info.get("distributed_type"), "fsdp_version": info.get("fsdp_version"),
            "fsdp_wrapped": info.get("fsdp_wrapped", False), "world_size": info.get("world_size", env_world_size()),
            "last_checkpoint": str(last.absolute()) if last else None, "final_model": final_model,
            "time": now(), **extra})
        channel.append_jsonl(self.wenv.progress, {"event": "end", "attempt": self.wenv.attempt, "time": now(),
                                                  "step": self.step, "state": state})

    def fail(self, exc: BaseException) -> None:
        if self.wenv is None:
            attempt_dir = os.environ.get(channel.ENV_ATTEMPT_DIR)
            if not attempt_dir:
                return
            self.wenv = WorkerEnv.from_environ(attempt_dir)
        phase = "train" if self.callback is not None and self.callback.optimizer_steps > 0 else "setup"
        write_error(self.wenv.error_file(self.rank), exc, self.rank, phase, self.step)
        try:
            self.write_status(channel.WORKER_FAILED, error=f"{type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001
            pass

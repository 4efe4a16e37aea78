"""What every supervised Trainer gets, from ``train_worker.py`` or around a user's own script.

:class:`OrchestrateCallback` writes the progress records, keeps the heartbeat's phase, stops every
rank at a step boundary on a stop signal (with a checkpoint), saves when the time interval passed
or a ``orchestrate checkpoint`` request came, and fires the test-only faults. The step path holds
no host sync (issue 18.1): the stop/save agreement is one asynchronous all-reduce launched at step
k and read at step k+K, K steps of about half a second (:class:`~.collectives.StepAgreement`), rank 0 reads the request file on a
thread of its own (:class:`RequestWatcher`, once a second), and every save belongs to the
:class:`~.save_manager.SaveManager` (commits and purges on its background thread).
:class:`WorkerRun` keeps this process's final records (``status.json``, ``error-rank<R>.json``).
:func:`attach` puts them on a trainer.
"""
from __future__ import annotations

import functools
import os
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from . import channel
from .checkpoints import latest_complete_checkpoint
from .collectives import StepAgreement, agree_any_off_path, distributed_info, gpu_memory, side_groups
from .epochs import global_batch_of, pad_to_global_batch
from .fence import halt, must_stop
from .heartbeat import Heartbeat
from .sample_log import install_sample_log
from .save_manager import SaveManager
from .support import SaveFault, StopFlag, WorkerEnv, env_rank, env_world_size, maybe_inject_fault, write_error
from .timing import RestoreTimer, StepClock, eval_fields


def _process_start() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - only the "wall" field depends on it
        return time.time()


T0 = _process_start()   # for the "wall" field: seconds since this rank's process started
REQUEST_POLL_S = 1.0    # how often rank 0 reads the checkpoint request file


def now() -> float:
    return round(time.time(), 3)


class RequestWatcher:
    """Rank 0, off the step path: the time of the newest ``orchestrate checkpoint`` request, and why the
    attempt must stop writing (:func:`~.fence.must_stop`: a newer lease generation, a stop request)."""

    def __init__(self, wenv: WorkerEnv, interval_s: float = REQUEST_POLL_S):
        self.run_dir, self.attempt, self.interval_s = wenv.progress.parent, wenv.attempt, interval_s
        self.path = self.run_dir / channel.REQUESTS_DIR / f"{channel.CHECKPOINT_REQUEST}.json"
        self.asked = 0.0
        self.halt_why = must_stop(self.run_dir, self.attempt)
        self._stop = threading.Event()

    def start(self) -> "RequestWatcher":
        threading.Thread(target=self._loop, name="orchestrate-requests", daemon=True).start()
        return self

    def _loop(self) -> None:
        while True:
            request = channel.read_json(self.path) or {}
            self.asked = max(self.asked, float(request.get("time") or 0))
            self.halt_why = self.halt_why or must_stop(self.run_dir, self.attempt)   # once fenced, always
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()


class OrchestrateCallback(TrainerCallback):
    """Progress records, phases, graceful stop, timed and requested saves, test faults."""

    def __init__(self, wenv: WorkerEnv, stop: StopFlag, resumed_from: str | None, tokens_base: int, fault):
        self.wenv, self.stop, self.resumed_from, self.fault = wenv, stop, resumed_from, fault
        self.rank = env_rank()
        self.trainer = None  # set by attach()
        self.info: dict = {}
        self.optimizer_steps = 0  # in this attempt; 0 means "still in setup"
        self.stopped = False
        self.t_begin, self.tokens_begin = time.time(), tokens_base
        self.heartbeat: Heartbeat | None = None
        self.saves: SaveManager | None = None
        self.agreement = StepAgreement()
        self.watcher: RequestWatcher | None = None
        self.every_s = float(os.environ.get(channel.ENV_SAVE_EVERY_S) or 0)
        self.last_save = time.monotonic()
        self.last_save_step = -1
        self.handled_request = 0.0
        self.asked_why: dict = {}   # rank 0: why it asked the other ranks for a save (not agreed yet)
        self.agreed_why: dict = {}  # rank 0: why the agreed save that comes next is made
        self.restore, self.steps = RestoreTimer(), StepClock(wenv.attempt_dir, self.rank)   # goodput (issue 20)

    def _halt_why(self) -> str | None:
        """Rank 0: why this attempt must stop and write nothing more (fence, stop request), read off the
        step path by the request thread once it runs, directly before."""
        if self.rank != 0:
            return None
        if self.watcher is not None:
            return self.watcher.halt_why
        return must_stop(self.wenv.progress.parent, self.wenv.attempt)

    def _record(self, event: str, step: int, **fields) -> None:
        if self.rank == 0 and not self._halt_why():   # fenced or asked to stop: writes nothing
            channel.append_jsonl(self.wenv.progress, {
                "event": event, "attempt": self.wenv.attempt, "time": now(), "step": step, **fields})

    def _tokens(self) -> int:
        return int(getattr(self.trainer, "_total_train_tokens", 0) or 0)

    # -- the trainer's events ----------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        # The model is wrapped (accelerator.prepare) before on_train_begin, so this is what really runs.
        self.info = distributed_info(self.trainer)
        self.t_begin, self.tokens_begin = time.time(), self._tokens()
        control_group, _writer = side_groups()      # collective: every rank is here
        self.agreement = StepAgreement(control_group)
        self.saves.start()
        if self.rank == 0 and self.watcher is None:
            self.watcher = RequestWatcher(self.wenv).start()
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
        self.heartbeat.step = step = state.global_step
        self.saves.poll()                    # a finished background save: only local bookkeeping, no collective
        stop = save = False
        decided = self.agreement.read(step)  # due at the same step on every rank, with the same values
        if decided is not None:
            stop, save, launched = decided
            if self.agreement.halted:        # fenced, or another host asked: every rank leaves, writing nothing
                halt(self.wenv, self.rank, step, self._halt_why() or "rank 0 was told to stop")
            save = save and self.last_save_step < launched   # a save since the launch did what was asked
        if stop:
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        elif save:
            control.should_save = True
        if stop or save:
            self.agreed_why, self.asked_why = self.asked_why, {}
            self.last_save = time.monotonic()
        if not stop and step < state.max_steps and self.agreement.ready():
            self.agreement.launch(step, bool(self.stop), self._save_due(), halt=bool(self._halt_why()))
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_training_stop or state.global_step >= state.max_steps:
            self.saves.settle()              # transformers may load the best checkpoint next: it must be complete

    def on_train_end(self, args, state, control, **kwargs):
        self.agreement.drain()
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        self.saves.close()                   # the save in flight is complete and committed before we leave
        self.steps.write()
        # Off the step path: read the fence exactly and agree, so that an attempt fenced in its last second
        # (after the last agreement) writes no final model and no "completed" either.
        why = must_stop(self.wenv.progress.parent, self.wenv.attempt) if self.rank == 0 else None
        if agree_any_off_path(why is not None):
            halt(self.wenv, self.rank, state.global_step, why or "rank 0 was told to stop")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        hb = self.heartbeat   # its "evaluating" phase began when evaluate() did (callback._phase_while_evaluating)
        self._record("eval", state.global_step,
                     **eval_fields(metrics, state.epoch, hb.phase_name, hb.since, time.time()))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "train_runtime" in logs:          # the final summary; transformers 5 loads the best model next
            self.saves.settle()
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
        """Rank 0: a ``orchestrate checkpoint`` request came, or the time interval passed. No I/O."""
        if self.rank != 0 or self.asked_why:
            return bool(self.asked_why)      # asked already: the decision is on its way
        asked = self.watcher.asked if self.watcher is not None else 0.0
        if asked > self.handled_request:
            self.handled_request = asked
            self.asked_why = {"reason": "requested", "requested": asked}
        elif self.every_s and time.monotonic() - self.last_save >= self.every_s:
            self.asked_why = {"reason": "time"}
        return bool(self.asked_why)

    def describe(self) -> tuple[dict, dict]:
        """When a save starts (every rank): ``(the marker's facts, why it is made)``; restarts the save clock."""
        self.last_save, self.last_save_step = time.monotonic(), int(self.trainer.state.global_step)
        why = self.agreed_why or self.asked_why     # a save right after rank 0 asked does what it asked
        self.agreed_why, self.asked_why = {}, {}
        args = self.trainer.args
        gb = global_batch(args)
        marker = {"attempt": self.wenv.attempt, "world_size": args.world_size, "global_batch": gb,
                  "samples": self.last_save_step * gb, "tokens": self._tokens(), **why}
        return marker, why


def global_batch(args) -> int:
    """Samples per optimizer step over every rank: micro-batch x gradient accumulation x world size."""
    return global_batch_of(args)


def attach(trainer, callback: OrchestrateCallback, heartbeat: Heartbeat) -> SaveManager:
    """Put the callback and the save manager on ``trainer`` (any transformers/TRL Trainer)."""
    callback.trainer, callback.heartbeat = trainer, heartbeat
    callback.restore.install(trainer)
    if callback not in trainer.callback_handler.callbacks:
        trainer.add_callback(callback)
    fault = SaveFault.parse(os.environ.get(channel.ENV_SAVE_FAULT), callback.wenv.attempt)
    callback.saves = SaveManager(trainer, heartbeat, fault, env_rank(), callback._record, callback.describe).install()
    _phase_while_evaluating(trainer, heartbeat)
    pad_to_global_batch(trainer, env_rank())
    install_sample_log(trainer, callback.wenv.attempt_dir, env_rank())   # test-only, off unless asked
    return callback.saves


def _phase_while_evaluating(trainer, heartbeat: Heartbeat) -> None:
    """The heartbeat says ``evaluating`` while ``trainer.evaluate`` runs (its own time limit applies)."""
    evaluate = trainer.evaluate

    @functools.wraps(evaluate)
    def evaluate_with_phase(*args, **kwargs):
        previous = heartbeat.phase_name
        heartbeat.phase("evaluating")
        try:
            return evaluate(*args, **kwargs)
        finally:
            heartbeat.phase(previous)
    trainer.evaluate = evaluate_with_phase


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

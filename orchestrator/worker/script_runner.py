"""Run a user's own training script under supervision, without editing it (issues 13 and 18.2).

torchrun starts ``python orchestrator/worker/script_runner.py SCRIPT --config worker_config.yaml``
on every rank. Before the script runs, this checks that the installed transformers has what the
save path relies on (else a USER_ERROR naming the version), and installs, from outside:

* on ``transformers.Trainer.__init__`` (every Trainer, TRL's included): on a CPU plan, the FSDP-on-CPU
  set-up, which must precede the Trainer's accelerator. Nothing else: a Trainer built only to evaluate
  or predict is left alone.
* on ``Trainer.train``: the Trainer whose ``train()`` is called becomes a *stage*
  (:mod:`orchestrator.worker.stages`) and gets, for that call, the callback and save hooks of
  ``train_worker.py`` (progress, phases, heartbeat, markers, async sharded saves, test faults), its own
  checkpoint folder, and its own resume point: the orchestrator's (``$ORCHESTRATE_RESUME_FROM``) goes only
  to the stage whose folder holds it; a stage an earlier attempt began resumes from the newest complete
  checkpoint of its folder (a finished stage from its last one, so it trains no step again and the
  script's next stage starts from its trained weights). A stop during ``train()`` ends the process as
  "stopped, resumable" (exit 75) right after the checkpoint, before the script's own code after
  ``train()`` (which would save a "final" model of an unfinished run).
* the stop signals (SIGTERM, ``launch.stop_signal``): while a stage trains, a flag (the callback stops
  every rank at a step boundary with a checkpoint); at any other time (no Trainer training, or one that
  never attaches) the process stops at once (exit 75), and a second signal gets the default action, so
  cancel and time limits work for any script.

A script that never creates a Trainer still runs: it is supervised by exit code and start-up timeout,
and its heartbeat's phase says ``script`` (status shows that no progress is reported).
"""
from __future__ import annotations

import functools
import os
import runpy
import signal
import sys
import time
from pathlib import Path

if __name__ == "__main__":   # run as a file by torchrun: make the package importable, then install early
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from orchestrator.worker import channel  # noqa: E402
from orchestrator.worker.checkpoints import (checkpoint_step, latest_complete_checkpoint,  # noqa: E402
                                             list_checkpoints, tokens_at_checkpoint)
from orchestrator.worker.heartbeat import Heartbeat  # noqa: E402
from orchestrator.worker.stages import StageEntry, read_stages, record_stage, stage_folder  # noqa: E402
from orchestrator.worker.support import (StopFlag, WorkerEnv, end_failed_rank, env_rank, parse_fault,  # noqa: E402
                                         resolve_resume)

SCRIPT_PHASE = "script"     # the heartbeat's phase while no Trainer trains
RUNNER_METHODS = ("train", "add_callback")   # what the runner itself wraps or calls


class _Stopped(BaseException):
    """Raised to end the script after a stop (not an Exception: the script's own ``except Exception``
    must not swallow it)."""


class _StageDone(BaseException):
    """Raised out of a finished stage's ``train()`` once its last checkpoint is loaded (see :meth:`ScriptRun.train`)."""


class ScriptStop(StopFlag):
    """The stop flag of a script: a flag while a stage trains, an immediate stop at any other time."""

    def __init__(self) -> None:
        super().__init__()
        self.training = False   # a stage is inside train(): its callback acts on the flag
        self.armed = False      # the script runs: outside train(), a signal ends it at once

    def _handler(self, signum, frame) -> None:
        super()._handler(signum, frame)
        if self.armed and not self.training:
            signal.signal(signum, signal.SIG_DFL)   # a second one is not caught again
            raise _Stopped()


STOP = ScriptStop()
if __name__ == "__main__":
    STOP.install()   # before the heavy imports, so that an early signal is not lost (the handler sets a flag)


def missing_trainer_hooks(trainer_or_class) -> list[str]:
    """The private Trainer attributes the runner and the save path rely on that the installed transformers lacks."""
    cls = trainer_or_class if isinstance(trainer_or_class, type) else type(trainer_or_class)
    from orchestrator.worker.save_manager import missing_trainer_hooks as save_path_missing   # the save manager's own list

    missing = [f"{cls.__name__}.{name}" for name in RUNNER_METHODS if not callable(getattr(cls, name, None))]
    return missing + save_path_missing(cls)


def supported_transformers() -> str:
    """The transformers range this package declares (pyproject.toml), e.g. ``>=5.0,<6``."""
    try:
        from importlib.metadata import requires

        for req in requires("orchestrate") or []:
            name, _, spec = req.partition(" ")
            if name.startswith("transformers") and "extra" not in req:
                return (spec or name[len("transformers"):]).strip("() ") or "any"
    except Exception:  # noqa: BLE001 - run from a source tree without metadata
        pass
    return "see pyproject.toml"


def check_transformers() -> None:
    """Fail at start-up, as a USER_ERROR naming the version, when the save path cannot work."""
    import transformers

    missing = missing_trainer_hooks(transformers.Trainer)
    if missing:
        raise ImportError(f"transformers {transformers.__version__} lacks {', '.join(missing)}, which orchestrate's "
                          f"checkpointing relies on; install a supported version (transformers"
                          f"{supported_transformers()})")


def _config_value(argv: list[str], key: str):
    """``key`` from ``--config FILE`` (and ``--key value`` after it), as the script will read it."""
    import yaml

    value = None
    if "--config" in argv:
        path = argv[argv.index("--config") + 1]
        value = (yaml.safe_load(Path(path).read_text()) or {}).get(key)
    flag = f"--{key}"
    if flag in argv and argv.index(flag) + 1 < len(argv):
        value = argv[argv.index(flag) + 1]
    return value


class Stage:
    """One Trainer whose ``train()`` the script called: where it checkpoints, where it resumes from."""

    def __init__(self, n: int, trainer, folder: Path, resume: str | None, why: str):
        self.n, self.trainer, self.folder, self.resume, self.why = n, trainer, folder, resume, why
        self.callback = None


class ScriptRun:
    """What this rank knows about the script it runs and the stages it trained."""

    def __init__(self, script: str, argv: list[str]):
        from orchestrator.worker.callback import WorkerRun

        self.script, self.argv = script, argv
        self.output_dir = str(_config_value(argv, "output_dir") or "trainer_output")
        self.att = WorkerRun()
        self.att.wenv = self.wenv = WorkerEnv.from_environ(self.output_dir)
        self.run_dir = self.wenv.progress.parent
        self.heartbeat = Heartbeat(self.wenv.attempt_dir, env_rank() == 0).start()
        self.heartbeat.phase(SCRIPT_PHASE)
        # The orchestrator's resume point (or the config's): it goes to the stage whose folder holds it.
        self.resume, self.why = resolve_resume(self.output_dir, _config_value(argv, "resume_from_checkpoint"))
        self.att.resume_step = checkpoint_step(self.resume)
        self.fault = parse_fault(os.environ.get(channel.ENV_FAULT), self.wenv.attempt)
        self.stages: list[Stage] = []
        self.active: Stage | None = None

    def install(self) -> None:
        import transformers

        check_transformers()
        run = self
        init, train = transformers.Trainer.__init__, transformers.Trainer.train

        @functools.wraps(init)
        def supervised_init(trainer, *args, **kwargs):
            run._prepare_args(kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None))
            init(trainer, *args, **kwargs)

        @functools.wraps(train)
        def supervised_train(trainer, resume_from_checkpoint=None, *args, **kwargs):
            return run.train(train, trainer, resume_from_checkpoint, *args, **kwargs)

        transformers.Trainer.__init__, transformers.Trainer.train = supervised_init, supervised_train

    def _prepare_args(self, training_args) -> None:
        """The CPU plan's FSDP needs gloo set up before the Trainer builds its accelerator."""
        from orchestrator.worker.cpu_fsdp import check_cpu_fsdp_args, enable_fsdp_on_cpu, fsdp_requested

        if training_args is None:
            return
        if self.att.training_args is None:
            self.att.training_args = training_args
        on_cpu = getattr(training_args, "use_cpu", False) or os.environ.get("ACCELERATE_USE_CPU", "").lower() in (
            "1", "true")
        if on_cpu and fsdp_requested(getattr(training_args, "fsdp_plugin_args", None)):
            check_cpu_fsdp_args(training_args.fsdp_plugin_args)
            enable_fsdp_on_cpu()

    # -- one train() call ----------------------------------------------------------------------
    def train(self, train, trainer, given, *args, **kwargs):
        """``trainer.train(given, ...)`` as a supervised stage: its folder, its resume point, its callback."""
        if self.active is not None:   # a train() inside a stage's train(): part of that stage
            return train(trainer, given, *args, **kwargs)
        stage = self._stage(trainer)
        resume = stage.resume if stage.resume else given
        if stage.resume and given not in (None, False, stage.resume):
            print(f"[orchestrate] stage {stage.n}: resuming from {stage.resume} ({stage.why}), not from {given!r} "
                  "as the script asks", file=sys.stderr, flush=True)
        elif stage.resume:
            print(f"[orchestrate] stage {stage.n}: resuming from {stage.resume} ({stage.why})", file=sys.stderr,
                  flush=True)
        user_dir = trainer.args.output_dir
        trainer.args.output_dir = str(stage.folder)
        self.active, STOP.training = stage, True
        try:
            out = train(trainer, resume, *args, **kwargs)
        except _StageDone:
            out = self._finished(stage)
        finally:
            self.active, STOP.training = None, False
            trainer.args.output_dir = user_dir
            self.heartbeat.phase(SCRIPT_PHASE)
        state = trainer.state
        if STOP or (stage.callback.stopped and state.global_step < state.max_steps):
            raise _Stopped()   # the checkpoint is committed (on_train_end); nothing after train() runs
        return out

    def _finished(self, stage: Stage):
        """A stage resumed from its last checkpoint: transformers would train one step more (its loop checks
        max_steps only after a step), so the stage ends once that checkpoint is loaded (model, optimizer, state)
        and the script goes on from the weights it trained."""
        from transformers.trainer_utils import TrainOutput

        state = stage.trainer.state
        stage.callback.on_train_end(stage.trainer.args, state, None)   # what train()'s end would do: saves closed
        loss = next((h["train_loss"] for h in reversed(state.log_history) if "train_loss" in h), None)
        loss = loss if loss is not None else next((h["loss"] for h in reversed(state.log_history) if "loss" in h), 0.0)
        print(f"[orchestrate] stage {stage.n}: already trained to step {state.global_step} ({stage.resume}); "
              "nothing to train again", file=sys.stderr, flush=True)
        return TrainOutput(state.global_step, float(loss), {"train_loss": float(loss), "epoch": state.epoch})

    def _stage(self, trainer) -> Stage:
        """The stage of ``trainer``, made (resume point chosen, callback attached) at its first train()."""
        from orchestrator.worker.callback import OrchestrateCallback, attach

        for stage in self.stages:
            if stage.trainer is trainer:
                return stage
        n = len(self.stages) + 1
        self.att.callback = None   # errors before this stage's first step are set-up errors
        folder = stage_folder(trainer.args.output_dir, n, [s.folder for s in self.stages])
        resume, why = self._resume_point(n, folder, type(trainer).__name__)
        stage = Stage(n, trainer, folder, resume, why)
        self.stages.append(stage)
        self.att.trainer, self.att.training_args, self.att.resume_step = trainer, trainer.args, checkpoint_step(resume)
        stage.callback = cb = OrchestrateCallback(self.wenv, STOP, resume, tokens_at_checkpoint(resume), self.fault)
        self.att.callback = cb
        attach(trainer, cb, self.heartbeat)
        trainer.add_callback(_finished_stage_callback())
        self.heartbeat.phase("loading")
        if env_rank() == 0:
            channel.append_jsonl(self.wenv.progress, {
                "event": "stage", "attempt": self.wenv.attempt, "time": round(time.time(), 3),
                "step": checkpoint_step(resume), "stage": n, "trainer": type(trainer).__name__,
                "folder": str(folder), "resumed_from": resume})
        return stage

    def _resume_point(self, n: int, folder: Path, trainer_name: str) -> tuple[str | None, str]:
        """Where stage ``n`` (checkpointing into ``folder``) resumes from; rank 0 lists the stage in the table."""
        table = read_stages(self.run_dir)
        listed = next((e for e in table if e.stage == n), None)
        earlier = listed is not None and Path(listed.folder) == folder and listed.attempt < self.wenv.attempt
        if env_rank() == 0 and not (listed is not None and Path(listed.folder) == folder):
            record_stage(self.run_dir, StageEntry(n, str(folder), trainer_name, self.wenv.attempt))
        if self.resume and self._resume_owner(table) == n:
            return self.resume, self.why
        if folder == Path(self.output_dir).absolute():
            return None, self.why    # the job's own folder: the supervisor chose (and found nothing to resume)
        if earlier:
            last = latest_complete_checkpoint(folder)
            return (str(last), f"stage {n}'s newest complete checkpoint") if last else (None, "no checkpoint")
        if n > 1 and list_checkpoints(folder):
            raise ValueError(f"{folder}: the checkpoint folder of training stage {n} ({trainer_name}) already holds "
                             "checkpoints this job did not write; give that Trainer an empty output_dir")
        return None, "no checkpoint"

    def _resume_owner(self, table: list[StageEntry]) -> int:
        """The stage whose folder holds the orchestrator's (or the config's) resume point; else the first."""
        parent = Path(self.resume).absolute().parent
        return next((e.stage for e in table if Path(e.folder) == parent), 1)


def _finished_stage_callback():
    """Ends ``train()`` at its beginning (checkpoint loaded) when the resumed stage has no step left."""
    from transformers import TrainerCallback

    class FinishedStage(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.max_steps and state.global_step >= state.max_steps:
                raise _StageDone()

    return FinishedStage()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: script_runner.py SCRIPT [--config FILE] [ARGS...]", file=sys.stderr)
        return 2
    run = ScriptRun(os.path.abspath(argv[0]), argv[1:])
    sys.argv = [run.script, *run.argv]
    sys.path.insert(0, str(Path(run.script).parent))
    try:
        run.install()
        if STOP:   # signalled during start-up: nothing to save
            raise _Stopped()
        STOP.armed = True
        runpy.run_path(run.script, run_name="__main__")
    except _Stopped:
        run.att.write_status(channel.WORKER_STOPPED, signal=STOP.signal or "another rank")
        return channel.EXIT_STOPPED
    except SystemExit as exc:
        if exc.code not in (0, None):
            run.att.write_status(channel.WORKER_FAILED, error=f"the script exited with {exc.code}")
            raise
    except BaseException as exc:
        STOP.armed = False
        run.att.fail(exc)
        end_failed_rank(exc, STOP, fast=False)   # the script may have atexit work: fast only if told to stop
        raise
    finally:
        STOP.armed = False
    # The script saves its final model its own way: the orchestrator's final-model check is for train_worker.py.
    note = "the script created no Trainer: no progress was reported" if not run.stages else None
    run.att.write_status(channel.WORKER_COMPLETED, **({"note": note} if note else {}))
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    from orchestrator.worker.spare import wait_for_attempt

    handed = wait_for_attempt(STOP, script=True)   # a spare attempt: imports done, wait to be handed it
    if handed is not None:
        from orchestrator.worker import callback

        callback.T0 = handed
    sys.exit(record(main)())

"""Run a user's own training script under supervision, without editing it (issue 13).

torchrun starts ``python orchestrator/worker/script_runner.py SCRIPT --config worker_config.yaml``
on every rank. Before the script runs, this installs, from outside:

* the stop-signal handler (a flag; the callback stops every rank at a step boundary with a checkpoint);
* on ``transformers.Trainer.__init__`` (so every Trainer the script creates, TRL's included): the same
  callback and save hooks as ``train_worker.py`` (progress, phases, heartbeat, markers, async sharded
  saves, test faults), and on a CPU plan the FSDP-on-CPU setup;
* on ``Trainer.train``: the resume point the orchestrator chose, when the script passes none (the
  seed's shape passes ``training_args.resume_from_checkpoint``, which ``--resume_from_checkpoint`` on
  the command line sets; a script that calls ``train()`` bare gets it here), and a stop ends the
  process as "stopped, resumable" (exit 75) right after the checkpoint, before the script's own code
  after ``train()`` (which would save a "final" model of an unfinished run).

A script that never creates a Trainer still runs: it is supervised by exit code and start-up timeout,
and its heartbeat's phase says ``script`` (status shows that no progress is reported).
"""
from __future__ import annotations

import functools
import os
import runpy
import sys
from pathlib import Path

if __name__ == "__main__":   # run as a file by torchrun: make the package importable, then install early
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from orchestrator.worker import channel  # noqa: E402
from orchestrator.worker.checkpoints import checkpoint_step, tokens_at_checkpoint  # noqa: E402
from orchestrator.worker.heartbeat import Heartbeat  # noqa: E402
from orchestrator.worker.support import StopFlag, WorkerEnv, env_rank, parse_fault, resolve_resume  # noqa: E402

STOP = StopFlag()
if __name__ == "__main__":
    STOP.install()   # before the heavy imports, so that an early signal is not lost (the handler sets a flag)
SCRIPT_PHASE = "script"     # the heartbeat's phase until the script creates a Trainer


class _Stopped(BaseException):
    """Raised out of ``Trainer.train`` after a graceful stop's checkpoint (not an Exception: the script's
    own ``except Exception`` must not swallow it)."""


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


class ScriptRun:
    """What this rank knows about the script it runs and the Trainer(s) it created."""

    def __init__(self, script: str, argv: list[str]):
        from orchestrator.worker.callback import WorkerRun

        self.script, self.argv = script, argv
        self.output_dir = str(_config_value(argv, "output_dir") or "trainer_output")
        self.att = WorkerRun()
        self.att.wenv = self.wenv = WorkerEnv.from_environ(self.output_dir)
        self.heartbeat = Heartbeat(self.wenv.attempt_dir, env_rank() == 0).start()
        self.heartbeat.phase(SCRIPT_PHASE)
        self.resume, self.why = resolve_resume(self.output_dir, _config_value(argv, "resume_from_checkpoint"))
        self.att.resume_step = checkpoint_step(self.resume)
        self.fault = parse_fault(os.environ.get(channel.ENV_FAULT), self.wenv.attempt)

    def script_argv(self) -> list[str]:
        """The script's own argv, with the resume point as the seed's shape reads it."""
        argv = [self.script, *self.argv]
        if self.resume and "--resume_from_checkpoint" not in argv:
            argv += ["--resume_from_checkpoint", self.resume]
        return argv

    def install(self) -> None:
        import transformers

        run = self
        init, train = transformers.Trainer.__init__, transformers.Trainer.train

        @functools.wraps(init)
        def supervised_init(trainer, *args, **kwargs):
            run._prepare_args(kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None))
            init(trainer, *args, **kwargs)
            run._attach(trainer)

        @functools.wraps(train)
        def supervised_train(trainer, resume_from_checkpoint=None, *args, **kwargs):
            if resume_from_checkpoint is None and run.resume:
                resume_from_checkpoint = run.resume
                print(f"[orchestrate] resuming from {run.resume} ({run.why})", file=sys.stderr, flush=True)
            out = train(trainer, resume_from_checkpoint, *args, **kwargs)
            cb = run.att.callback
            if cb is not None and cb.stopped and trainer.state.global_step < trainer.state.max_steps:
                raise _Stopped()
            return out

        transformers.Trainer.__init__, transformers.Trainer.train = supervised_init, supervised_train

    def _prepare_args(self, training_args) -> None:
        """The CPU plan's FSDP needs gloo set up before the Trainer builds its accelerator."""
        from orchestrator.worker.cpu_fsdp import check_cpu_fsdp_args, enable_fsdp_on_cpu, fsdp_requested

        if training_args is None:
            return
        self.att.training_args = training_args
        on_cpu = getattr(training_args, "use_cpu", False) or os.environ.get("ACCELERATE_USE_CPU", "").lower() in (
            "1", "true")
        if on_cpu and fsdp_requested(getattr(training_args, "fsdp_plugin_args", None)):
            check_cpu_fsdp_args(training_args.fsdp_plugin_args)
            enable_fsdp_on_cpu()

    def _attach(self, trainer) -> None:
        from orchestrator.worker.callback import OrchestrateCallback, attach

        if self.att.callback is not None:
            return   # a second Trainer (e.g. for evaluation only) is not the one supervised
        self.att.trainer = trainer
        self.att.training_args = trainer.args
        self.att.callback = cb = OrchestrateCallback(self.wenv, STOP, self.resume, tokens_at_checkpoint(self.resume),
                                                     self.fault)
        attach(trainer, cb, self.heartbeat)
        self.heartbeat.phase("loading")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: script_runner.py SCRIPT [--config FILE] [ARGS...]", file=sys.stderr)
        return 2
    run = ScriptRun(os.path.abspath(argv[0]), argv[1:])
    run.install()
    sys.argv = run.script_argv()
    sys.path.insert(0, str(Path(run.script).parent))
    try:
        runpy.run_path(run.script, run_name="__main__")
    except _Stopped:
        run.att.write_status(channel.WORKER_STOPPED, signal=STOP.signal or "another rank")
        return channel.EXIT_STOPPED
    except SystemExit as exc:
        if exc.code not in (0, None):
            run.att.write_status(channel.WORKER_FAILED, error=f"the script exited with {exc.code}")
            raise
    except BaseException as exc:
        run.att.fail(exc)
        raise
    # The script saves its final model its own way: the orchestrator's final-model check is for train_worker.py.
    note = "the script created no Trainer: no progress was reported" if run.att.callback is None else None
    run.att.write_status(channel.WORKER_COMPLETED, **({"note": note} if note else {}))
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())

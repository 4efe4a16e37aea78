"""The training worker: the seed's TRL SFT full fine-tuning script, made observable and resumable.

Run it exactly like the seed::

    ACCELERATE_USE_FSDP=1 FSDP_CPU_RAM_EFFICIENT_LOADING=1 \\
        torchrun --nproc_per_node=2 train_worker.py --config config.yaml [--key value ...]

Arguments: TRL's ``TrlParser((ScriptArguments, SFTConfig))`` (YAML keys or ``--key value``).

Environment (all optional; the worker also runs by hand):

* ``ORCHESTRATE_RUN_DIR``: where ``progress.jsonl`` goes (default ``output_dir``);
* ``ORCHESTRATE_ATTEMPT_DIR``: where ``status.json`` and ``error-rank<R>.json`` go (default ``output_dir``);
* ``ORCHESTRATE_ATTEMPT``: attempt number (default 1);
* ``ORCHESTRATE_RESUME_FROM``: checkpoint path, or ``none`` to start fresh (see
  :func:`orchestrator.worker.support.resolve_resume` for the full precedence);
* ``ORCHESTRATE_FAULT``: test-only fault injection, ``hang|crash|exit:RANK:STEP[:always]``.

Exit status: 0 completed; 75 (``channel.EXIT_STOPPED``) stopped on SIGTERM/SIGUSR1/SIGUSR2 after
saving a checkpoint on every rank (or before training started); anything else failed.
"""
from __future__ import annotations

import time

_T0 = time.time()  # the attempt's process start, for the "wall" field

import os  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from orchestrator.worker import channel  # noqa: E402
from orchestrator.worker.checkpoints import (  # noqa: E402
    checkpoint_step,
    latest_complete_checkpoint,
    rotate_checkpoints,
    tokens_at_checkpoint,
    write_checkpoint_marker,
)
from orchestrator.worker.heartbeat import Heartbeat  # noqa: E402
from orchestrator.worker.save_hooks import SaveHooks  # noqa: E402
from orchestrator.worker.support import (  # noqa: E402
    SaveFault,
    StopFlag,
    WorkerEnv,
    env_rank,
    env_world_size,
    maybe_inject_fault,
    parse_fault,
    resolve_resume,
    write_error,
)

# Installed before the heavy imports (when run as a script) so that an early signal is not lost;
# the handler only sets a flag.
STOP = StopFlag()
if __name__ == "__main__":
    STOP.install()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


@dataclass
class ScriptArguments:
    """The seed's script arguments."""

    model_id: str | None = field(default=None, metadata={"help": "Model name or path (model and tokenizer)."})
    dataset_path: str | None = field(
        default=None, metadata={"help": "Folder with train_dataset.json (and test_dataset.json), chat JSON lines."})
    max_seq_length: int | None = field(
        default=None, metadata={"help": "Legacy name of SFTConfig.max_length; used only if max_length is not given."})
    dtype: str | None = field(
        default=None, metadata={"help": "dtype to load the weights in (auto, float32, bfloat16, ...); the seed's "
                                        "torch_dtype. model_init_kwargs.dtype wins if both are given."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention implementation for from_pretrained (sdpa, flash_attention_2, ...). "
                                        "'orchestrate_varlen' (the plan's default for packed rows) is registered "
                                        "here: per-document attention, see orchestrator/worker/varlen_attn.py. "
                                        "model_init_kwargs.attn_implementation wins if both are given."})


def _now() -> float:
    return round(time.time(), 3)


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree_any(flag: bool, device) -> bool:
    """True on every rank if ``flag`` is true on any rank (all_reduce MAX; gloo on CPU)."""
    if not _dist_on():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if _dist_on():
        dist.barrier()


def distributed_info(trainer) -> dict:
    """What actually ran: accelerate's distributed type and whether the model really is FSDP-wrapped."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    acc = trainer.accelerator
    dtype = getattr(acc.distributed_type, "value", str(acc.distributed_type))
    version = None
    for model in (trainer.model_wrapped, trainer.model):
        mods = list(model.modules()) if isinstance(model, torch.nn.Module) else []
        if any(isinstance(m, FSDPModule) for m in mods):
            version = 2
            break
        if any(isinstance(m, FullyShardedDataParallel) for m in mods):
            version = 1
            break
    return {"distributed_type": dtype, "fsdp_version": version, "fsdp_wrapped": version is not None,
            "world_size": acc.num_processes}


def _gpu_memory() -> dict:
    """issue 6: rank 0's peak GPU memory so far (for bench/throughput.py and OOM diagnosis); {} on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return {}


class OrchestrateCallback(TrainerCallback):
    """Progress records, checkpoint markers, graceful stop and fault injection (see module doc)."""

    def __init__(self, wenv: WorkerEnv, resumed_from: str | None, tokens_base: int, fault):
        self.wenv, self.resumed_from, self.tokens_base, self.fault = wenv, resumed_from, tokens_base, fault
        self.rank = env_rank()
        self.trainer = None  # set once the trainer exists
        self.info: dict = {}
        self.optimizer_steps = 0  # in this attempt; 0 means "still in setup"
        self.stopped = False
        self.t_begin = time.time()
        self.tokens_begin = tokens_base
        self.heartbeat: Heartbeat | None = None  # rank 0's phase and liveness beat
        self.hooks: SaveHooks | None = None      # the save path: timing, safe rotation, test faults

    def _record(self, event: str, state, **fields) -> None:
        if self.rank == 0:
            channel.append_jsonl(self.wenv.progress, {
                "event": event, "attempt": self.wenv.attempt, "time": _now(), "step": state.global_step, **fields})

    def _tokens(self) -> int:
        return int(getattr(self.trainer, "_total_train_tokens", 0) or 0)

    def on_train_begin(self, args, state, control, **kwargs):
        # The model is wrapped (accelerator.prepare) before on_train_begin, so this is what really runs.
        self.info = distributed_info(self.trainer)
        self.t_begin, self.tokens_begin = time.time(), self._tokens()
        self.heartbeat.phase("training", state.global_step)
        self._record("start", state, max_steps=state.max_steps, num_train_epochs=state.num_train_epochs,
                     resumed_from=self.resumed_from, world_size=self.info["world_size"],
                     distributed_type=self.info["distributed_type"], fsdp_version=self.info["fsdp_version"],
                     fsdp_wrapped=self.info["fsdp_wrapped"])

    def on_step_begin(self, args, state, control, **kwargs):
        maybe_inject_fault(self.fault, self.rank, state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        self.optimizer_steps += 1
        self.heartbeat.step = state.global_step
        if agree_any(bool(STOP), self.trainer.accelerator.device):
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:  # eval and the final summary have no training loss
            return
        tokens = int(logs.get("num_tokens", self._tokens()))
        elapsed = max(time.time() - self.t_begin, 1e-9)
        self._record("log", state, max_steps=state.max_steps, loss=float(logs["loss"]),
                     learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"), tokens=tokens,
                     tokens_per_s=round((tokens - self.tokens_begin) / elapsed, 2), epoch=logs.get("epoch"),
                     wall=round(time.time() - _T0, 3), **_gpu_memory())

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        barrier()  # every rank has finished writing its part
        self.hooks.point("marker")
        if self.rank == 0:
            write_checkpoint_marker(path, state.global_step, tokens=self._tokens(), attempt=self.wenv.attempt)
            # save_total_limit only now that the new checkpoint is complete (see worker/save_hooks.py)
            best = (state.best_model_checkpoint,) if state.best_model_checkpoint else ()
            rotate_checkpoints(args.output_dir, args.save_total_limit, keep=best,
                               before_delete=lambda _: self.hooks.point("rotate"))
            self._record("checkpoint", state, path=str(path.absolute()), save_s=self.hooks.finished())
        else:
            self.hooks.finished()


def _given(argv: list[str], key: str) -> bool:
    """Was ``key`` set explicitly, on the command line or in the ``--config`` YAML?"""
    if any(a == f"--{key}" or a.startswith(f"--{key}=") for a in argv):
        return True
    if "--config" in argv:
        import yaml

        with open(argv[argv.index("--config") + 1]) as f:
            return key in (yaml.safe_load(f) or {})
    return False


def parse_args(argv: list[str]):
    from trl import SFTConfig, TrlParser

    script_args, training_args = TrlParser((ScriptArguments, SFTConfig)).parse_args_and_config(argv)
    if not script_args.model_id:
        raise ValueError("model_id is required (config key or --model_id)")
    if not script_args.dataset_path:
        raise ValueError("dataset_path is required (config key or --dataset_path)")
    if script_args.max_seq_length and not _given(argv, "max_length"):
        training_args.max_length = script_args.max_seq_length
    return script_args, training_args


def _messages_problem(msgs) -> str | None:
    if msgs is None:
        return "no 'messages'"
    if not isinstance(msgs, list) or not msgs:
        return "'messages' is not a non-empty list"
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in msgs):
        return "a message without a string 'role' and 'content'"
    return None


def load_chat_dataset(path: Path):
    """One chat JSON-lines file, checked up front so a bad row fails with its file and row."""
    from datasets import load_dataset

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (dataset_path must hold {path.name})")
    try:
        ds = load_dataset("json", data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: cannot be read as JSON lines ({type(e).__name__}: {e})") from e
    if "messages" not in ds.column_names:
        raise ValueError(f"{path}: no 'messages' field in any row (fields: {ds.column_names}); expected one "
                         'chat per line: {"messages": [{"role": "user", "content": "..."}, ...]}')
    bad = [(i + 1, why) for i, msgs in enumerate(ds["messages"]) if (why := _messages_problem(msgs))]
    if bad:
        shown = "; ".join(f"line {n}: {why}" for n, why in bad[:5])
        raise ValueError(f"{path}: {len(bad)} bad row(s) ({shown}{'; ...' if len(bad) > 5 else ''}); expected "
                         'one chat per line: {"messages": [{"role": "user", "content": "..."}, ...]}')
    if len(ds) == 0:
        raise ValueError(f"{path}: no rows")
    return ds


_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def load_model(model_id: str, training_args, dtype: str | None = None, attn_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = dict(training_args.model_init_kwargs or {})
    if dtype:
        kwargs.setdefault("dtype", _DTYPE_ALIASES.get(dtype, dtype))
    if attn_implementation:
        kwargs.setdefault("attn_implementation", attn_implementation)
    if str(kwargs.get("attn_implementation", "")).startswith("orchestrate_"):  # issue 6: our varlen kernel
        from orchestrator.worker.varlen_attn import register

        register()
    if "torch_dtype" in kwargs:  # renamed in transformers 5
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    if isinstance(kwargs.get("dtype"), str) and kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    training_args.model_init_kwargs = None  # used here; SFTTrainer would only warn about them
    return AutoModelForCausalLM.from_pretrained(model_id, **kwargs)


class WorkerRun:
    """This process's bookkeeping for its attempt's final records (status.json, error-rank<R>.json).

    Not the ledger's :class:`~orchestrator.store.ledger.AttemptRecord`: that is the
    orchestrator's record of the whole attempt; this lives and dies with one rank.
    """

    def __init__(self):
        self.rank = env_rank()
        self.wenv: WorkerEnv | None = None
        self.trainer = None
        self.callback: OrchestrateCallback | None = None
        self.training_args = None
        self.fast_exit = False  # see _exit()
        self.resume_step = 0  # global step of the checkpoint this attempt resumes from


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
            "time": _now(), **extra})
        channel.append_jsonl(self.wenv.progress, {"event": "end", "attempt": self.wenv.attempt, "time": _now(),
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


def save_final_model(trainer) -> str | None:
    """Full weights in ``output_dir`` (collective under FSDP: every rank calls it)."""
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model()
    barrier()
    out = Path(trainer.args.output_dir)
    return str(out.absolute()) if any(out.glob("*.safetensors")) else None


def run(argv: list[str], att: WorkerRun) -> int:
    from transformers import AutoTokenizer, set_seed
    from trl import SFTTrainer

    from orchestrator.worker.cpu_fsdp import check_cpu_fsdp_args, enable_fsdp_on_cpu, fsdp_requested

    script_args, training_args = parse_args(argv)
    att.training_args = training_args
    att.fast_exit = not training_args.report_to  # no reporting integration that needs atexit hooks
    att.wenv = wenv = WorkerEnv.from_environ(training_args.output_dir)
    fault = parse_fault(os.environ.get(channel.ENV_FAULT), wenv.attempt)
    heartbeat = Heartbeat(wenv.attempt_dir, env_rank() == 0).start()
    if STOP:  # signalled during start-up: nothing to save
        att.write_status(channel.WORKER_STOPPED, signal=STOP.signal or "another rank")
        return channel.EXIT_STOPPED
    resume, why = resolve_resume(training_args.output_dir, training_args.resume_from_checkpoint)
    att.resume_step = checkpoint_step(resume)
    set_seed(training_args.seed)
    on_cpu = training_args.use_cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if on_cpu and fsdp_requested(training_args.fsdp_plugin_args):
        check_cpu_fsdp_args(training_args.fsdp_plugin_args)
        enable_fsdp_on_cpu()

    heartbeat.phase("loading")
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = Path(script_args.dataset_path)
    train_ds = load_chat_dataset(data / "train_dataset.json")
    eval_ds = None
    if training_args.eval_strategy != "no" and (data / "test_dataset.json").is_file():
        eval_ds = load_chat_dataset(data / "test_dataset.json")
    model = load_model(script_args.model_id, training_args, script_args.dtype, script_args.attn_implementation)

    tokens_base = tokens_at_checkpoint(resume)
    att.callback = cb = OrchestrateCallback(wenv, resume, tokens_base, fault)
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=[cb])
    att.trainer = cb.trainer = trainer
    cb.heartbeat = heartbeat
    cb.hooks = SaveHooks(trainer, heartbeat, SaveFault.parse(os.environ.get(channel.ENV_SAVE_FAULT), wenv.attempt),
                         env_rank()).install()
    trainer._total_train_tokens = tokens_base  # TRL's count restarts at 0 on resume; keep it job-wide
    if resume:
        print(f"[orchestrate] resuming from {resume} ({why})", file=sys.stderr, flush=True)

    if agree_any(bool(STOP), trainer.accelerator.device):  # signalled before training: nothing new to save
        cb.info = distributed_info(trainer)
        att.write_status(channel.WORKER_STOPPED, signal=STOP.signal or "another rank")
        return channel.EXIT_STOPPED
    trainer.train(resume_from_checkpoint=resume)

    if cb.stopped and trainer.state.global_step < trainer.state.max_steps:
        att.write_status(channel.WORKER_STOPPED, signal=STOP.signal or "another rank")
        return channel.EXIT_STOPPED
    final_model = save_final_model(trainer)
    att.write_status(channel.WORKER_COMPLETED, final_model=final_model)
    return 0


def main(argv: list[str] | None = None, allow_fast_exit: bool = False) -> int:
    att = WorkerRun()
    try:
        code = run(sys.argv[1:] if argv is None else list(argv), att)
    except Exception as exc:
        att.fail(exc)
        raise
    # An explicit barrier + destroy_process_group avoided an occasional SIGABRT at exit (notes/cpu-training.md).
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()
    if allow_fast_exit and att.fast_exit:
        _exit(code)
    return code


def _exit(code: int) -> None:
    """Leave without interpreter teardown once every record is written and the process group is gone.

    Tearing down torch/transformers/trl costs 1.5-3 s per rank on a small CPU box and is where the
    occasional abort-at-exit happens; nothing is lost when no reporting integration (wandb, ...)
    waits on atexit hooks, which is the only case this is used in.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    # record(): torchrun's failure summary then shows each failed rank's exception, not "<N/A>".
    sys.exit(record(main)(allow_fast_exit=True))

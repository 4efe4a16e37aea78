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

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.worker import channel  # noqa: E402
from orchestrator.worker.checkpoints import checkpoint_step, tokens_at_checkpoint  # noqa: E402
from orchestrator.worker.heartbeat import Heartbeat  # noqa: E402
from orchestrator.worker.support import StopFlag, WorkerEnv, env_rank, parse_fault, resolve_resume  # noqa: E402

# Installed before the heavy imports (when run as a script) so that an early signal is not lost;
# the handler only sets a flag.
STOP = StopFlag()
if __name__ == "__main__":
    STOP.install()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from orchestrator.worker.callback import OrchestrateCallback, WorkerRun, attach  # noqa: E402
from orchestrator.worker.collectives import agree_any, barrier, distributed_info  # noqa: E402


@dataclass
class ScriptArguments:
    """The seed's script arguments."""

    model_id: str | None = field(default=None, metadata={"help": "Model name or path (model and tokenizer)."})
    dataset_path: str | None = field(
        default=None, metadata={"help": "Folder with train_dataset.json or train.jsonl (and test_dataset.json or "
                                        "test.jsonl/eval.jsonl), a datasets save_to_disk folder, or one .json/.jsonl/"
                                        ".parquet file. Rows: messages, prompt/completion or text (TRL's shapes)."})
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


def load_data(script_args, training_args):
    """The training split (and the eval split when evaluation is on), every row checked against the shape of
    the first: TRL's messages, prompt/completion (plain or conversational), text (``dataset_text_field``),
    ... from a folder, a single .json/.jsonl/.parquet file or a ``save_to_disk`` folder
    (see :mod:`orchestrator.worker.data`, which ``orchestrate validate`` reads too)."""
    from orchestrator.worker.data import load

    loaded = load(script_args.dataset_path, training_args.dataset_text_field or "text",
                  want_eval=training_args.eval_strategy != "no")
    if env_rank() == 0:
        print(f"[orchestrate] data: {loaded.description}", file=sys.stderr, flush=True)
    return loaded.train, loaded.eval


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


def save_final_model(trainer) -> str | None:
    """Full weights in ``output_dir`` (collective under FSDP: every rank calls it)."""
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model()
    barrier()
    out = Path(trainer.args.output_dir)
    return str(out.absolute()) if any(out.glob("*.safetensors")) else None


def record_final_logits(trainer, wenv) -> None:
    """The trained weights' logits on a fixed input (every rank: a collective under FSDP); rank 0 writes
    them for the orchestrator's check of the saved final model (orchestrator/supervise/final_model.py)."""
    from orchestrator.worker.export import fingerprint

    record = fingerprint(trainer.model)
    if env_rank() == 0:
        channel.write_json_atomic(wenv.attempt_dir / channel.FINAL_LOGITS_FILE, record)


def run(argv: list[str], att: WorkerRun) -> int:
    from transformers import set_seed
    from trl import SFTTrainer

    from orchestrator.worker.cpu_fsdp import check_cpu_fsdp_args, enable_fsdp_on_cpu, fsdp_requested
    from orchestrator.worker.model_check import load_tokenizer

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
    tokenizer = load_tokenizer(script_args.model_id)   # pad = eos where it has none; checked against the model
    train_ds, eval_ds = load_data(script_args, training_args)
    model = load_model(script_args.model_id, training_args, script_args.dtype, script_args.attn_implementation)

    tokens_base = tokens_at_checkpoint(resume)
    att.callback = cb = OrchestrateCallback(wenv, STOP, resume, tokens_base, fault)
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=[cb])
    att.trainer = trainer
    attach(trainer, cb, heartbeat)
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
    record_final_logits(trainer, wenv)
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

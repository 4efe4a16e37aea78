"""The parts of a checkpoint folder, written in the layout transformers' own resume reads.

:func:`write_parts` writes what ``Trainer._save_checkpoint`` writes, through public API only
(``Trainer.save_model``, accelerate's ``save_fsdp_model``/``save_fsdp_optimizer``, ``TrainerState``):

* the model: FSDP sharded (``pytorch_model_fsdp_0/``, staged for the background writer when one is
  given), FSDP full (``model.safetensors`` and ``pytorch_model_fsdp.bin``), or ``save_model``
  (``model.safetensors``, config, tokenizer) without FSDP;
* the optimizer (``optimizer_0/``, ``optimizer.bin`` or ``optimizer.pt``), ``scheduler.pt`` and
  ``scaler.pt`` (when a gradient scaler runs), unless ``save_only_model``;
* this rank's RNG states (``rng_state_<rank>.pth``, ``rng_state.pth`` on one process);
* ``trainer_state.json`` last (rank 0), with the exportable callbacks' state, as transformers does.

What this does not cover (DeepSpeed, XLA, SageMaker, pushing checkpoints to the Hub, hyperparameter
search) goes through transformers' own ``_save_checkpoint``: :func:`own_layout_unsupported` says why.
"""
from __future__ import annotations

import inspect
import os
import random
import warnings
from typing import Callable

from .async_save import Stager, stage_fsdp_model, stage_fsdp_optimizer

# transformers' file names (transformers.trainer: OPTIMIZER_NAME, SCHEDULER_NAME, SCALER_NAME, TRAINER_STATE_NAME)
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
SCALER_NAME = "scaler.pt"
TRAINER_STATE_NAME = "trainer_state.json"


def own_layout_unsupported(trainer, trial) -> str | None:
    """Why this save goes through transformers' own ``_save_checkpoint`` (``None``: it does not)."""
    if trial is not None or getattr(trainer, "hp_search_backend", None) is not None:
        return "hyperparameter search"
    if getattr(trainer, "is_deepspeed_enabled", False):
        return "DeepSpeed"
    if trainer.args.push_to_hub:
        return "push_to_hub"
    from transformers.utils import is_sagemaker_mp_enabled, is_torch_xla_available

    if is_torch_xla_available() or is_sagemaker_mp_enabled():
        return "XLA or SageMaker model parallelism"
    return None


def write_parts(trainer, output_dir: str, stager: Stager | None, point: Callable[[str], None]) -> None:
    """Write (or stage) every part of a checkpoint into ``output_dir``; ``point(name)`` after each part."""
    args = trainer.args
    trainer.store_flos()
    write_model(trainer, output_dir, stager)
    point("model")
    if not args.save_only_model:
        write_optimizer(trainer, output_dir, stager)
        point("optimizer")
        write_rng(trainer, output_dir)
        point("rng")
    write_trainer_state(trainer, output_dir)


def _fsdp_kwargs(fn) -> dict:
    # transformers passes adapter_only=True where accelerate has it (it only changes PEFT models)
    return {"adapter_only": True} if "adapter_only" in inspect.signature(fn).parameters else {}


def _sharded(trainer) -> bool:
    return "SHARDED" in str(trainer.accelerator.state.fsdp_plugin.state_dict_type)


def _save_model(trainer, output_dir: str) -> None:
    # _internal_call: no push to the Hub from a checkpoint (transformers passes it too)
    internal = "_internal_call" in inspect.signature(trainer.save_model).parameters
    trainer.save_model(output_dir, **({"_internal_call": True} if internal else {}))


def write_model(trainer, output_dir: str, stager: Stager | None) -> None:
    """The model's weights (every rank calls it: collective under FSDP)."""
    if not trainer.is_fsdp_enabled:
        _save_model(trainer, output_dir)
        return
    if stager is not None and _sharded(trainer):
        stage_fsdp_model(trainer, output_dir, stager)
        return
    from accelerate.utils import save_fsdp_model

    _save_model(trainer, output_dir)   # FULL_STATE_DICT: model.safetensors on rank 0
    acc = trainer.accelerator
    save_fsdp_model(acc.state.fsdp_plugin, acc, trainer.model, output_dir, **_fsdp_kwargs(save_fsdp_model))


def write_optimizer(trainer, output_dir: str, stager: Stager | None) -> None:
    """Optimizer, learning-rate scheduler and gradient scaler (every rank calls it)."""
    import torch

    args, acc = trainer.args, trainer.accelerator
    if trainer.is_fsdp_enabled:
        if stager is not None and _sharded(trainer):
            stage_fsdp_optimizer(trainer, output_dir, stager)
        else:
            from accelerate.utils import save_fsdp_optimizer

            save_fsdp_optimizer(acc.state.fsdp_plugin, acc, trainer.optimizer, trainer.model, output_dir)
    elif args.should_save:
        torch.save(trainer.optimizer.state_dict(), os.path.join(output_dir, OPTIMIZER_NAME))
    if not args.should_save:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the scheduler's "please also save the optimizer" warning
        torch.save(trainer.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
    scaler = getattr(acc, "scaler", None)
    if scaler is not None:
        torch.save(scaler.state_dict(), os.path.join(output_dir, SCALER_NAME))


def write_rng(trainer, output_dir: str) -> None:
    """This rank's RNG states, as ``Trainer._load_rng_state`` reads them."""
    import numpy as np
    import torch
    from transformers.training_args import ParallelMode

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        distributed = trainer.args.parallel_mode == ParallelMode.DISTRIBUTED
        states["cuda"] = torch.cuda.random.get_rng_state_all() if distributed else torch.cuda.random.get_rng_state()
    os.makedirs(output_dir, exist_ok=True)
    world = trainer.args.world_size
    name = "rng_state.pth" if world <= 1 else f"rng_state_{trainer.args.process_index}.pth"
    torch.save(states, os.path.join(output_dir, name))


def write_trainer_state(trainer, output_dir: str) -> None:
    """``trainer_state.json`` (rank 0), with the state of every exportable callback and of the control."""
    from transformers.trainer_callback import ExportableState

    if not trainer.args.should_save:
        return
    state = trainer.state
    for cb in [*trainer.callback_handler.callbacks, trainer.control]:
        if not isinstance(cb, ExportableState):
            continue
        name = type(cb).__name__
        if isinstance(state.stateful_callbacks.get(name), list):
            state.stateful_callbacks[name].append(cb.state())
        else:
            state.stateful_callbacks[name] = cb.state()
    state.save_to_json(os.path.join(output_dir, TRAINER_STATE_NAME))

"""Sharded checkpoints staged on the training path and written in the background (DCP).

With FSDP2 and ``SHARDED_STATE_DICT`` each rank writes its own shard; nothing is gathered on rank
0. A save is split in two: *staging* (on the training path: the model's and optimizer's sharded
state dicts are copied off the live tensors with DCP's ``DefaultStager``) and *persisting*
(:func:`persist`: ``dcp.save`` of the staged copies, run by the save manager's background thread
over a gloo group of its own, so that its collectives never interleave with training's). The
folder layout is accelerate's (``pytorch_model_fsdp_0/``, ``optimizer_0/``), so transformers' own
``resume_from_checkpoint`` reads it as before.
"""
from __future__ import annotations

import os

MODEL_DIR = "pytorch_model_fsdp_0"      # accelerate's FSDP_MODEL_NAME + "_0"
OPTIMIZER_DIR = "optimizer_0"           # accelerate's OPTIMIZER_NAME + "_0"
ENV_ASYNC_SAVE = "ORCHESTRATE_ASYNC_SAVE"   # "0": sharded saves are written on the training path


class Stager:
    """Copies sharded state dicts off the live tensors now; :func:`persist` writes them later."""

    def __init__(self):
        self.items: list[tuple[str, dict]] = []

    def stage(self, directory: str, state_dict: dict) -> None:
        """Copy ``state_dict`` now, to be written to ``directory``."""
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        # No pinned or shared memory and no async staging: the copy is done when this returns.
        stager = DefaultStager(StagingOptions(False, False, False, False))
        try:
            staged = stager.stage(state_dict)
        finally:
            stager.close()
        os.makedirs(directory, exist_ok=True)
        self.items.append((directory, staged))

    def take(self) -> list[tuple[str, dict]]:
        """Everything staged so far (and forget it here)."""
        items, self.items = self.items, []
        return items


def persist(items: list[tuple[str, dict]], group=None) -> None:
    """Write staged state dicts, in order (every rank, collectively over ``group``)."""
    import torch.distributed.checkpoint as dcp

    for directory, state_dict in items:
        dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(directory), process_group=group)


def sharded_async_enabled(trainer) -> bool:
    """The background path applies to FSDP2 with sharded state dicts on more than one rank."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return False
    plugin = trainer.accelerator.state.fsdp_plugin
    return (getattr(plugin, "fsdp_version", 1) == 2 and "SHARDED" in str(plugin.state_dict_type)
            and trainer.accelerator.num_processes > 1 and os.environ.get(ENV_ASYNC_SAVE, "1") != "0")


def stage_fsdp_model(trainer, output_dir: str, stager: Stager) -> None:
    """The FSDP2 model's sharded state dict, staged for ``output_dir/pytorch_model_fsdp_0``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=False))
    stager.stage(os.path.join(output_dir, MODEL_DIR), {"model": sd})


def stage_fsdp_optimizer(trainer, output_dir: str, stager: Stager) -> None:
    """The optimizer's sharded state dict, staged for ``output_dir/optimizer_0``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)   # accelerate's AcceleratedOptimizer
    osd = get_optimizer_state_dict(trainer.model, optimizer, options=StateDictOptions(full_state_dict=False))
    stager.stage(os.path.join(output_dir, OPTIMIZER_DIR), {"optimizer": osd})

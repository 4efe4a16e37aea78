"""Small agreements between the ranks of an attempt (gloo on CPU, the training backend on GPU),
and what actually ran (accelerate's distributed type, whether the model is really FSDP-wrapped)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reduce(flag: bool, device, op) -> bool:
    if not dist_on():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=op)
    return bool(t.item())


def agree_any(flag: bool, device) -> bool:
    """True on every rank if ``flag`` is true on any rank (all_reduce MAX)."""
    return _reduce(flag, device, dist.ReduceOp.MAX if dist.is_available() else None)


def agree_all(flag: bool, device) -> bool:
    """True on every rank if ``flag`` is true on every rank (all_reduce MIN); also a barrier."""
    return _reduce(flag, device, dist.ReduceOp.MIN if dist.is_available() else None)


def barrier() -> None:
    if dist_on():
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


def gpu_memory() -> dict:
    """Rank 0's peak GPU memory so far (for bench/throughput.py and OOM diagnosis); {} on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return {}

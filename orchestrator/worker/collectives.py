"""Agreements between the ranks of an attempt, and what actually ran (accelerate's distributed
type, whether the model is really FSDP-wrapped).

:class:`StepAgreement` is the one collective on the step path (issue 18.1): the stop and save
flags of every rank in a single all-reduce, launched asynchronously at the end of step k and read
at the end of step k+K (K agreed in the same reduce from the measured step time, so a decision takes
about a second at most), so every rank decides the same thing at the same step and the host never
waits for it. It runs on a gloo group of its own over CPU tensors (:func:`side_groups`): no device
tensor, no ``.item()`` on a GPU value, no host-device sync, and no interleaving with training's
own collectives. The background checkpoint thread has a second gloo group, so its collectives
(DCP's and the commit's) never meet the step path's either. :func:`agree_any` and
:func:`agree_all` are the blocking forms, for the few places off the step path.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

# Bench-only: "1" turns the step agreement off (no collective; a stop or a timed/requested save is then not
# agreed between ranks, so a stop is not graceful). bench/agreement.py compares runs with and without it.
ENV_NO_AGREEMENT = "ORCHESTRATE_BENCH_NO_AGREEMENT"
_GROUPS: dict[str, object] = {}


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reduce(flag: bool, device, op, group=None) -> bool:
    if not dist_on():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=op, group=group)
    return bool(t.item())


def agree_any(flag: bool, device) -> bool:
    """True on every rank if ``flag`` is true on any rank (all_reduce MAX)."""
    return _reduce(flag, device, dist.ReduceOp.MAX if dist.is_available() else None)


def agree_all(flag: bool, device) -> bool:
    """True on every rank if ``flag`` is true on every rank (all_reduce MIN); also a barrier."""
    return _reduce(flag, device, dist.ReduceOp.MIN if dist.is_available() else None)


def agree_any_off_path(flag: bool) -> bool:
    """:func:`agree_any` on the control gloo group with a CPU tensor (no device sync), for the points off
    the step path (the end of training); the group must exist already (:func:`side_groups`)."""
    return _reduce(flag, "cpu", dist.ReduceOp.MAX, group=side_groups()[0]) if dist_on() else bool(flag)


def barrier() -> None:
    if dist_on():
        dist.barrier()


def side_groups() -> tuple[object, object]:
    """``(control, writer)``: two gloo groups over every rank, made once per process (``(None, None)``
    without a process group). Every rank must call this at the same point the first time (it is
    collective): the callback does at ``on_train_begin``."""
    if not dist_on():
        return None, None
    if not _GROUPS:
        _GROUPS["control"] = dist.new_group(backend="gloo")
        _GROUPS["writer"] = dist.new_group(backend="gloo")
    return _GROUPS["control"], _GROUPS["writer"]


class StepAgreement:
    """Stop and save, agreed by every rank with one asynchronous all-reduce every ``period`` steps.

    A reduce launched at step k is read at step k + period (:meth:`read` returns ``None`` at the steps
    in between), and the next is launched at once. Each reduce carries every rank's flags (``stop``,
    ``save``: true if any rank asked) and its proposal for the next period, from its measured step
    time, so that a flag raised just after a launch is decided within about ``2 x target_s`` (two
    periods); the smallest proposal wins, so every rank reads and launches at the same steps. The
    wait in :meth:`read` is normally free (the reduce ran meanwhile on gloo's own threads). Without a
    process group (one process) the flags of one step are the decision of the next.
    """

    TARGET_S = 0.5       # a period of about half a second: a decision within about one second
    MAX_PERIOD = 64

    def __init__(self, group=None, enabled: bool | None = None, clock=None):
        import time

        self.group = group
        self.distributed = dist_on()
        self.enabled = (os.environ.get(ENV_NO_AGREEMENT) != "1") if enabled is None else enabled
        self.clock = clock or time.monotonic
        self.period = 1
        self.halted = False   # the last read agreed a halt (see launch)
        self._work = None
        self._flags = torch.zeros(3, dtype=torch.int32)
        self._launched: tuple[int, float] | None = None    # (step, clock) of the reduce in flight
        self._previous: tuple[int, float] | None = None    # of the one before (for the step time)

    def ready(self) -> bool:
        """No reduce in flight: the caller launches one now (every rank at the same step)."""
        return self.enabled and self._launched is None

    def launch(self, step: int, stop: bool, save: bool, halt: bool = False) -> None:
        """This rank's flags, read back (every rank's together) at ``step + period``.

        ``halt`` (rank 0 fenced, or a stop request from another host) is a stop that writes nothing:
        it travels as a larger value of the stop flag, and :attr:`halted` says it was agreed."""
        now = self.clock()
        proposal = 1
        if self._previous is not None and step > self._previous[0]:
            per_step = (now - self._previous[1]) / (step - self._previous[0])
            proposal = max(1, min(self.MAX_PERIOD, int(self.TARGET_S / max(per_step, 1e-6))))
        self._launched = self._previous = (step, now)
        # one MAX reduce for all three: any stop, any save, and the smallest proposal (as -max(-p))
        self._flags = torch.tensor([2 if halt else int(bool(stop)), int(bool(save)), -proposal], dtype=torch.int32)
        if self.distributed:
            self._work = dist.all_reduce(self._flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True)

    def read(self, step: int) -> tuple[bool, bool, int] | None:
        """``(stop, save, step of the launch)`` agreed by every rank, at the step it is due; else ``None``."""
        if self._launched is None or step < self._launched[0] + self.period:
            return None
        if self._work is not None:
            self._work.wait()
            self._work = None
        stop, save, neg = self._flags.tolist()   # a CPU tensor: no device sync
        launched, self._launched, self.period = self._launched[0], None, max(1, -neg)
        self.halted = stop >= 2
        return bool(stop), bool(save), launched

    def drain(self) -> None:
        """Wait for a launched reduce nobody will read (the end of training): leave no collective behind."""
        if self._work is not None:
            self._work.wait()
        self._work, self._launched = None, None


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


class GroupCollectives:
    """Blocking collectives over one group (the background writer's), for :class:`~.commit.Committer`;
    the single-process forms without a process group."""

    def __init__(self, group=None):
        self.group = group if dist_on() else None

    def all_ok(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on every rank."""
        if self.group is None:
            return bool(flag)
        t = torch.tensor([int(bool(flag))], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.tolist()[0])

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.group is None:
            return [obj]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

"""Make accelerate really run FSDP on CPU (gloo) instead of silently falling back to DDP.

Why: in accelerate 1.15 (``accelerate/state.py``, ``AcceleratorState.__init__``) the switch
to ``DistributedType.FSDP`` only happens inside the branch for accelerator device types
(MULTI_GPU, MULTI_XPU, ...). With ``use_cpu=True`` under torchrun, ``PartialState`` picks
``MULTI_CPU`` and that branch is skipped: the FSDP plugin is dropped without a word and the
model is wrapped in DDP. PyTorch's FSDP2 (``fully_shard``) itself works on CPU with gloo, so
after the original ``__init__`` we do what the GPU branch does: set ``distributed_type`` to
FSDP, keep ``fsdp_plugin``, call ``fsdp_plugin.set_mixed_precision(...)`` when mixed
precision is on, and write the type back into ``PartialState._shared_state`` (both states
share it; ``Trainer.is_fsdp_enabled`` and ``Accelerator.prepare`` read it from there).

Only FSDP2 is promoted: FSDP1 does not run on CPU through accelerate 1.15 ("no available
devices found" with ``sync_module_states``, "Inconsistent compute device" without), so with
an FSDP1 plugin we leave accelerate's MULTI_CPU (DDP) choice alone and say so in a warning.

Apply with :func:`enable_fsdp_on_cpu` before the ``Trainer`` builds its ``Accelerator``;
callers report what actually ran from ``accelerator.distributed_type`` and the model type,
never from the config. Re-check this patch whenever accelerate is upgraded.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os

logger = logging.getLogger(__name__)

_PATCH_FLAG = "_orchestrate_cpu_fsdp_patch"


def fsdp_requested(fsdp_plugin_args: dict | None) -> bool:
    """FSDP asked for through the training arguments or ``ACCELERATE_USE_FSDP``."""
    return fsdp_plugin_args is not None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def check_cpu_fsdp_args(fsdp_plugin_args: dict | None) -> None:
    """Fail early and clearly for FSDP1 on CPU (accelerate's own error names GPU device types)."""
    if fsdp_plugin_args is not None and int(fsdp_plugin_args.get("fsdp_version", 2)) == 1:
        raise ValueError("fsdp_config.version: 1 (FSDP1) cannot run on CPU with accelerate 1.15; "
                         "use fsdp_config.version: 2 (the default) or run on GPUs")


def _promote(state, fsdp_plugin) -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if fsdp_plugin is None or state.distributed_type != DistributedType.MULTI_CPU:
        return
    if getattr(fsdp_plugin, "fsdp_version", 1) != 2:
        logger.warning(
            "FSDP%s was requested on CPU, but accelerate cannot run FSDP1 on CPU; running DDP "
            "(MULTI_CPU) instead. Use fsdp_config: {version: 2}.", getattr(fsdp_plugin, "fsdp_version", 1)
        )
        return
    state.distributed_type = DistributedType.FSDP
    if state._mixed_precision != "no":
        fsdp_plugin.set_mixed_precision(state._mixed_precision)
    state.fsdp_plugin = fsdp_plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def enable_fsdp_on_cpu() -> bool:
    """Patch ``AcceleratorState.__init__`` once per process; returns True if newly patched."""
    from accelerate.state import AcceleratorState

    original = AcceleratorState.__init__
    if getattr(original, _PATCH_FLAG, False):
        return False
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        bound = signature.bind_partial(self, *args, **kwargs)
        _promote(self, bound.arguments.get("fsdp_plugin"))

    setattr(__init__, _PATCH_FLAG, True)
    AcceleratorState.__init__ = __init__
    return True

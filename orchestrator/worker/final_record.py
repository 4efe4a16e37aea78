"""What the worker records about the final model it saves: ``attempts/<n>/final_model.json`` (rank 0).

``{"format": 1, "folder": ..., "algorithm": "xxh3_128", "tensors": {key: {"dtype", "shape", "digest"}},
"logits": {"input_ids", "shape", "dtype", "device", "attn_implementation", "logits"}, "best": {...}?,
"digest_s": ...}``
(or ``{"error": why}`` when no digest could be taken).

``tensors`` holds a digest of every tensor of the state ``save_model()`` wrote (under FSDP: the full
state dict it gathered; :func:`capture_saved_state`), keyed as in the model, in the dtype each was
saved in (read back from the written headers; a tensor saved in another dtype than it was trained
in is cast first, as the save did). ``logits``: the trained model's logits on a fixed input, with the
dtype it computed them in, the kind of device and the attention implementation. ``best``: with ``load_best_model_at_end``, the
checkpoint the trainer says is best. :mod:`.folder_check` compares the saved folder with all this.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from . import digests
from .folder_check import FIXED_INPUT, load_names, tied_keys

FORMAT = 1


@contextlib.contextmanager
def capture_saved_state(trainer):
    """While active, keep the state dict ``trainer._save`` writes on the saving rank: ``box["state"]``
    (``None`` when it saves the model's own ``state_dict()``); ``box["called"]`` says it was called."""
    box: dict = {"called": False, "state": None}
    had_own = "_save" in vars(trainer)
    original = trainer._save

    def _save(output_dir=None, state_dict=None):
        if trainer.args.should_save:
            box["called"] = True
            box["state"] = dict(state_dict) if state_dict is not None else None   # save_pretrained pops from it
        return original(output_dir, state_dict=state_dict)

    trainer._save = _save
    try:
        yield box
    finally:
        if had_own:
            trainer._save = original
        else:
            del trainer._save


def fingerprint(model) -> dict:
    """The logits of ``model`` on the fixed input, with the dtype they were computed in, the device kind and
    the attention implementation (a collective under FSDP: every rank calls it)."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(FIXED_INPUT, device=device)).logits
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return {"input_ids": FIXED_INPUT, "shape": list(logits.shape), "dtype": digests.dtype_name(logits.dtype),
            "device": device.type, "attn_implementation": attn if isinstance(attn, str) else None,
            "logits": logits.float().cpu().flatten().tolist()}


def trained_logits(trainer) -> dict:
    """:func:`fingerprint` of the trained model as it computes without accelerate's autocast wrapper, so that
    the check can compute the same way: FSDP2's mixed precision still computes in its ``param_dtype`` (the
    logits come out in it), a model without it in its weights' dtype. Every rank calls it (FSDP)."""
    try:
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    except Exception:  # noqa: BLE001 - an accelerate without it: the model as it is (every rank alike)
        model = trainer.model
    return fingerprint(model)


def saved_dtypes(folder: Path) -> dict[str, str]:
    """``{file key: dtype}`` from the headers of the safetensors files in ``folder``."""
    out = {}
    for path in digests.weight_files(folder)[0]:
        for name, info in digests.read_header(path)[1].items():
            out[name] = digests.ST_DTYPES.get(info["dtype"], info["dtype"])
    return out


def build_record(model, state: dict, folder: str | Path, logits: dict | None = None, best: dict | None = None) -> dict:
    """The record of ``state`` (what was saved from ``model`` into ``folder``)."""
    import torch

    if not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise digests.NotComparable("the state save_model() wrote holds no tensor on this rank")
    if any(type(v).__name__ == "DTensor" for v in state.values()):
        raise digests.NotComparable("the saved state holds sharded tensors (DTensor), not the gathered weights")
    files = saved_dtypes(Path(folder))
    names, _ = load_names(model, files, model_keys=state)
    dtypes = {names[k]: dt for k, dt in files.items()}
    for target, source in tied_keys(model).items():
        if target not in dtypes and source in dtypes:
            dtypes[target] = dtypes[source]
    algo, began = digests.algorithm(), time.monotonic()
    tensors = digests.state_digests({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, algo, dtypes)
    record = {"format": FORMAT, "folder": str(folder), "algorithm": algo, "tensors": tensors,
              "digest_s": round(time.monotonic() - began, 3), "logits": logits}
    if best is not None:
        record["best"] = best
    return record


def best_of(trainer) -> dict | None:
    """``{"checkpoint", "metric", "value"}`` when the config asks for the best model at the end, else None."""
    args, state = trainer.args, trainer.state
    if not getattr(args, "load_best_model_at_end", False):
        return None
    return {"checkpoint": state.best_model_checkpoint, "metric": args.metric_for_best_model,
            "value": state.best_metric}


def final_record(trainer, box: dict, folder: str | None, logits: dict | None) -> dict:
    """The record for the final save of ``trainer`` (rank 0), or ``{"error": why}``: never raises."""
    try:
        if folder is None:
            return {"format": FORMAT, "error": "save_model() wrote no *.safetensors"}
        model = trainer.accelerator.unwrap_model(trainer.model)
        state = box.get("state")
        if state is None:
            if not box.get("called") or trainer.is_fsdp_enabled:
                raise digests.NotComparable("the state save_model() wrote was not seen (transformers' "
                                            "Trainer._save was not called with it)")
            state = model.state_dict()
        return build_record(model, state, folder, logits, best_of(trainer))
    except Exception as exc:  # noqa: BLE001 - the check then says why it could not run; the job is not lost
        return {"format": FORMAT, "folder": folder, "error": f"no digests of the saved weights: "
                                                             f"{type(exc).__name__}: {exc}", "logits": logits}

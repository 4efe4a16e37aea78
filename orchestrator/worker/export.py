"""A Hugging Face model folder people can use, from a job's final weights or any complete checkpoint.

``python -m orchestrator.worker.export verify FOLDER REFERENCE.json``: load FOLDER with
``AutoModelForCausalLM.from_pretrained`` and compare its logits on a fixed input with those the
worker recorded from the trained weights in memory (:func:`fingerprint`); exit 0 if they match.

``python -m orchestrator.worker.export export CHECKPOINT BASE OUT``: the weights of CHECKPOINT
(sharded DCP ``pytorch_model_fsdp_0/`` or a full ``model.safetensors``) into OUT as config,
safetensors, tokenizer and generation config (from BASE, the model the job started from), then
the same check against the checkpoint's own weights. Runs in a process of its own (the
orchestrator never imports torch); prints one JSON line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

FIXED_INPUT = [[1, 5, 9, 14, 2, 7, 11, 3, 8, 13, 4, 6, 10, 12, 15, 16]]   # token ids every vocabulary has
RTOL, ATOL = 1e-4, 1e-5
MODEL_DIR = "pytorch_model_fsdp_0"


def _logits(model):
    import torch

    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(FIXED_INPUT, device=device)).logits.float().cpu()


def fingerprint(model) -> dict:
    """The logits of ``model`` on the fixed input (a collective under FSDP: every rank calls it)."""
    logits = _logits(model)
    return {"input_ids": FIXED_INPUT, "shape": list(logits.shape), "logits": logits.flatten().tolist()}


def compare(logits, reference: dict) -> tuple[bool, float]:
    """Whether ``logits`` match the recorded ones, and the largest absolute difference."""
    import torch

    ref = torch.tensor(reference["logits"]).reshape(reference["shape"])
    if list(logits.shape) != list(ref.shape):
        return False, float("inf")
    diff = float((logits - ref).abs().max())
    return bool(torch.allclose(logits, ref, rtol=RTOL, atol=ATOL)), diff


def check_folder(folder: str | Path, reference: dict | None = None) -> dict:
    """Load ``folder`` as a user would; compare with ``reference`` logits if given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    missing = [n for n in ("config.json", "generation_config.json") if not (folder / n).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    result: dict = {"folder": str(folder), "missing": missing}
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype="float32")
    AutoTokenizer.from_pretrained(folder)
    logits = _logits(model)
    if reference is not None:
        result["match"], result["max_abs_diff"] = compare(logits, reference)
    result["ok"] = not missing and result.get("match", True)
    return result


def load_checkpoint_weights(checkpoint: str | Path, base: str | Path):
    """A model built from ``base``'s config with the weights of ``checkpoint`` (sharded or full)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = Path(checkpoint)
    if (checkpoint / "model.safetensors").is_file() or (checkpoint / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype="float32")
    import torch.distributed.checkpoint as dcp

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base), torch_dtype="float32")
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(checkpoint / MODEL_DIR))    # no process group: one process reads all shards
    model.load_state_dict(state["model"])
    return model


def export(checkpoint: str | Path, base: str | Path, out: str | Path) -> dict:
    """Write ``checkpoint``'s weights as a Hugging Face folder in ``out`` and check it loads and matches."""
    from transformers import AutoTokenizer, GenerationConfig

    model = load_checkpoint_weights(checkpoint, base)
    reference = fingerprint(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model.generation_config = GenerationConfig.from_pretrained(base)
    except OSError:
        pass   # the base model has none: save_pretrained writes the model's default
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return check_folder(out, reference)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[0] == "verify":
        reference = json.loads(Path(argv[2]).read_text())
        result = check_folder(argv[1], reference)
    elif len(argv) == 4 and argv[0] == "export":
        result = export(argv[1], argv[2], argv[3])
    else:
        print("usage: python -m orchestrator.worker.export verify FOLDER REFERENCE.json | "
              "export CHECKPOINT BASE OUT", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

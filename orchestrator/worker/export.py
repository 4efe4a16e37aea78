"""A Hugging Face model folder people can use, from a job's final weights or any complete checkpoint.

``python -m orchestrator.worker.export verify FOLDER RECORD.json [--logits-budget-mb N]``: compare
FOLDER with the worker's record of the weights it saved there (:mod:`.folder_check`: config and
tokenizer load, every tensor's digest, optionally the logits).

``python -m orchestrator.worker.export export CHECKPOINT BASE OUT [--logits-budget-mb N]``: the weights
of CHECKPOINT (sharded DCP ``pytorch_model_fsdp_0/`` or a full ``model.safetensors``), in the dtype
they were saved in, into OUT as config, safetensors, tokenizer and generation config (from BASE, the
model the job started from), then the same check against the weights it wrote.

Each runs in a process of its own (the orchestrator never imports torch) and prints one JSON line:
``{"verdict": "verified"|"mismatch"|"unverified", "reason", "folder", "method", "peak_rss_mb", ...}``;
exit status 0 verified, 1 mismatch, 3 unverified (the check could not run), 2 usage.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .folder_check import LOGITS_BUDGET, MISMATCH, UNVERIFIED, VERIFIED, check_folder
from .final_record import build_record, fingerprint

MODEL_DIR = "pytorch_model_fsdp_0"
EXIT = {VERIFIED: 0, MISMATCH: 1, UNVERIFIED: 3}


def _dcp_dtype(folder: Path):
    """The dtype most of a DCP checkpoint's model tensors were saved in."""
    from collections import Counter

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(folder)).read_metadata()
    counts = Counter(md.properties.dtype for fqn, md in meta.state_dict_metadata.items()
                     if fqn.startswith("model.") and isinstance(md, TensorStorageMetadata)
                     and md.properties.dtype.is_floating_point)
    return counts.most_common(1)[0][0] if counts else None


def load_checkpoint_weights(checkpoint: str | Path, base: str | Path):
    """A model built from ``base``'s config with the weights of ``checkpoint`` (sharded or full), in their saved dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = Path(checkpoint)
    if (checkpoint / "model.safetensors").is_file() or (checkpoint / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto")
    import torch.distributed.checkpoint as dcp

    dtype = _dcp_dtype(checkpoint / MODEL_DIR)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base), dtype=dtype)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(checkpoint / MODEL_DIR))    # no process group: one process reads all shards
    model.load_state_dict(state["model"])
    return model


def export(checkpoint: str | Path, base: str | Path, out: str | Path, logits_budget: int = LOGITS_BUDGET) -> dict:
    """Write ``checkpoint``'s weights as a Hugging Face folder in ``out``; check it as a job's final model is checked."""
    from transformers import AutoTokenizer, GenerationConfig

    model = load_checkpoint_weights(checkpoint, base)
    logits = fingerprint(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model.generation_config = GenerationConfig.from_pretrained(base)
    except OSError:
        pass   # the base model has none: save_pretrained writes the model's default
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    record = build_record(model, model.state_dict(), out, logits)
    return check_folder(out, record, logits_budget)


def peak_rss_mb() -> float | None:
    """This process's own peak resident memory so far, in MiB. On Linux from ``VmHWM``: ``ru_maxrss``
    also counts the parent's peak, which a child started by fork + exec inherits."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.worker.export")
    sub = p.add_subparsers(dest="verb", required=True)
    v = sub.add_parser("verify")
    v.add_argument("folder")
    v.add_argument("record")
    e = sub.add_parser("export")
    e.add_argument("checkpoint")
    e.add_argument("base")
    e.add_argument("out")
    for q in (v, e):
        q.add_argument("--logits-budget-mb", type=float, default=LOGITS_BUDGET / 2**20)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    budget = int(args.logits_budget_mb * 2**20)
    if args.verb == "export":     # an export that breaks raises: the verb fails with the traceback
        result = export(args.checkpoint, args.base, args.out, budget)
    else:
        try:
            path = Path(args.record)
            record = json.loads(path.read_text()) if path.is_file() else {"error": f"{path} is missing"}
            result = check_folder(args.folder, record, budget)
        except Exception as exc:  # noqa: BLE001 - a check that breaks could not run: it says why, never fails a job
            result = {"folder": args.folder, "verdict": UNVERIFIED, "method": "digest",
                      "reason": f"the check itself failed: {type(exc).__name__}: {exc}"}
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))
    return EXIT[result["verdict"]]


if __name__ == "__main__":
    sys.exit(main())

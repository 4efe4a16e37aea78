"""The plan's inputs from the outside world, read once and passed to the pure planning code.

Planning itself (:mod:`orchestrator.plan.make`) reads nothing: what the machine offers
(:func:`detect_topology`), the shape of the model (:func:`read_model_shape`, from its
``config.json``) and where the worker script is installed (:func:`default_worker_script`)
are read here, by the caller, and handed in.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path
from typing import Any

from .memory import ModelShape
from .topology import Topology

# (shape or None, where it came from or why there is none): what make_plan takes as ``model``.
ModelInfo = tuple[ModelShape | None, str]


def detect_topology() -> Topology:
    """Count GPUs with torch (a no-op on CPU-only builds) and usable CPU cores."""
    physical, memory = 0, 0
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) not in ("", "-1"):
        import torch

        if torch.cuda.is_available():
            # device_count already honours CUDA_VISIBLE_DEVICES.
            physical = torch.cuda.device_count()
            if physical:
                memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(physical))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Topology(gpus=physical, cpus=cpus, hostname=socket.gethostname(),
                    gpu_memory_gib=round(memory / 2**30, 2) if physical else None,
                    liger_installed=importlib.util.find_spec("liger_kernel") is not None)


# Public configs of the models the shipped example configs name, so that --dry-run can estimate them on a
# machine that has not downloaded them. Anything else: a local folder with config.json.
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000),
    "meta-llama/Llama-3.1-8B": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256),
    "Qwen/Qwen2.5-7B": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, attention_bias=True, model_type="qwen2"),
}


def read_model_shape(model_id: str | None) -> ModelInfo:
    """``(shape, where it came from)``, or ``(None, why not)``. Reads ``<model_id>/config.json`` only."""
    if not model_id:
        return None, "no model_id"
    if model_id in KNOWN_MODELS:
        return ModelShape.from_config(KNOWN_MODELS[model_id]), f"built-in config of {model_id}"
    path = Path(model_id) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"{path} not found (a hub id? use a local folder to get an estimate)"
    except (OSError, ValueError) as e:
        return None, f"{path}: {type(e).__name__}: {e}"
    try:
        return ModelShape.from_config(cfg), str(path)
    except (KeyError, TypeError, ValueError) as e:
        return None, f"{path}: not a decoder config the estimator knows (missing {e})"


def default_worker_script() -> str:
    """Where the installed ``train_worker`` module lives (editable or regular install)."""
    spec = importlib.util.find_spec("train_worker")
    if spec is None or not spec.origin:
        raise RuntimeError("train_worker.py is not installed; run 'pip install -e .' in the repository")
    return os.path.abspath(spec.origin)


CONVERSATIONAL = ("messages", "conversations", "conversational_prompt_completion")


def inspect_inputs(training: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(notices, problems)`` from reading the data and the model the way the worker will (``validate``,
    ``submit``): the data's splits and row shape, a Hub id that cannot be resolved, the tokenizer against the
    embeddings, the FSDP wrap classes. Paths are absolute here; a missing one was reported by the config."""
    from ..worker import architecture, data, model_check

    notices: list[str] = []
    problems: list[str] = []
    shape = None
    dataset = training.get("dataset_path")
    if isinstance(dataset, str) and Path(dataset).exists():
        n, p, shape = data.validate(dataset, str(training.get("dataset_text_field") or "text"),
                                    str(training.get("eval_strategy") or "no"))
        notices += n
        problems += p
    if training.get("assistant_only_loss") and shape is not None and shape.name not in CONVERSATIONAL:
        problems.append(f"assistant_only_loss: true needs conversational rows (messages), but the rows are "
                        f"{shape.label}; set it false, or use messages rows")
    model = training.get("model_id")
    if not isinstance(model, str) or not model:
        return notices, problems
    if model.startswith("/") and not (Path(model) / "config.json").is_file():
        return notices, problems          # a local folder the config already reported
    folder, n, p = model_check.locate(model)
    notices += n
    problems += p
    if folder is None:
        return notices, problems
    conversational = shape is not None and shape.name in CONVERSATIONAL
    n, p = model_check.check_folder(folder, conversational=conversational,
                                    chat_template_given=bool(training.get("chat_template_path")),
                                    assistant_only=conversational and bool(training.get("assistant_only_loss")))
    notices += n
    problems += p
    n, p = architecture.check_wrap(model_check.read_config(folder), training)
    return notices + n, problems + p


def read_model_config(model_id: str | None) -> dict[str, Any]:
    """``config.json`` of a local folder or a cached Hub id ({} when there is none to read)."""
    from ..worker import model_check

    if not model_id:
        return {}
    folder = Path(model_id) if Path(model_id).is_dir() else model_check.cached_folder(model_id)
    return model_check.read_config(folder) if folder is not None else {}

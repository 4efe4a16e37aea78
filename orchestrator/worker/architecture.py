"""What the model's architecture means for FSDP and attention, read from its ``config.json`` (issue 16.5).

* :func:`wrap_classes`: the decoder-layer classes FSDP wraps one by one (``TRANSFORMER_BASED_WRAP``).
  accelerate takes them from the model class's ``_no_split_modules`` unless
  ``fsdp_config.transformer_layer_cls_to_wrap`` names others; a name the model does not have fails only
  when the ranks wrap the model ("Could not find the transformer layer class ..."), and a model with none
  is silently wrapped as one unit. :func:`check_wrap` says both before anything starts.
* :func:`attention_features`: sliding windows and attention logit soft-capping, which decide whether the
  fused varlen kernel can compute packed rows (``varlen_attn.unfused_reason``).

Only the model class is imported (no weights, no instance); importing transformers costs a few seconds once.
"""
from __future__ import annotations

import sys
from typing import Any

WRAP_KEY = "fsdp_config.transformer_layer_cls_to_wrap"


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config (multimodal configs nest it as ``text_config``)."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) and "vocab_size" in inner and "vocab_size" not in config else config


def causal_lm_class(config: dict[str, Any]):
    """The transformers class ``AutoModelForCausalLM`` builds for this config, or None (unknown/remote code)."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or config.get("auto_map"):
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if not name:
        return None
    import transformers

    try:
        return getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError):
        return None


def _defined(cls, name: str) -> bool:
    """Is ``name`` a module class of ``cls``'s modeling file (where its layers are defined)?"""
    import torch

    found = getattr(sys.modules.get(cls.__module__), name, None)
    return isinstance(found, type) and issubclass(found, torch.nn.Module)


def wrap_classes(config: dict[str, Any]) -> tuple[str, list[str]] | None:
    """``(model class name, layer classes FSDP wraps by default)``, or None when the class is unknown here."""
    cls = causal_lm_class(config)
    if cls is None:
        return None
    names = [n for n in (getattr(cls, "_no_split_modules", None) or []) if _defined(cls, n)]
    return cls.__name__, names


def _named(fsdp_config: dict[str, Any]) -> list[str] | None:
    value = fsdp_config.get("transformer_layer_cls_to_wrap")
    if value is None:
        return None
    return [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]


def check_wrap(config: dict[str, Any], training: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(notices, problems)`` about the FSDP wrap classes of this model under these training keys."""
    fc = training.get("fsdp_config") if isinstance(training.get("fsdp_config"), dict) else {}
    if not training.get("fsdp") or fc.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP") != "TRANSFORMER_BASED_WRAP":
        return [], []
    found = wrap_classes(config)
    if found is None:
        return [], []
    cls_name, defaults = found
    named = _named(fc)
    if named is not None:
        cls = causal_lm_class(config)
        missing = [n for n in named if not _defined(cls, n)]
        if missing:
            hint = f" (its decoder layer: {', '.join(defaults)})" if defaults else ""
            return [], [f"{WRAP_KEY}: {', '.join(missing)} is not a layer class of {cls_name}{hint}; remove the key "
                        "(the model's own layer class is found) or name the right one"]
        return [], []
    if not defaults:
        return [f"fsdp: {cls_name} names no layer class to wrap (_no_split_modules): the whole model is one FSDP "
                f"unit, gathered at once; set {WRAP_KEY} to its decoder layer class"], []
    return [], []


def attention_features(config: dict[str, Any]) -> dict[str, Any]:
    """``{"sliding_window": int|None, "softcap": float|None}`` of the attention layers this config builds."""
    config = text_config(config)
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list):
        if not any(t == "sliding_attention" for t in layer_types):
            window = None
    elif config.get("use_sliding_window") is False:
        window = None
    softcap = config.get("attn_logit_softcapping")
    return {"sliding_window": window if isinstance(window, int) and window > 0 else None,
            "softcap": float(softcap) if isinstance(softcap, (int, float)) and softcap else None}


def unfused_reason(sliding_window: int | None, softcap: float | None, max_len: int | None = None) -> str | None:
    """Why torch's fused varlen kernel cannot compute these attention layers exactly (None: it can)."""
    if softcap is not None:
        return f"attention logit soft-capping ({softcap:g}) has no fused varlen kernel in torch"
    if sliding_window is not None and (max_len is None or max_len > sliding_window):
        return f"a sliding window of {sliding_window} tokens, shorter than the documents may be, has no fused varlen kernel"
    return None


def attention_notice(worker_config: dict[str, Any], model_config: dict[str, Any], varlen: str) -> str | None:
    """The plan's notice when packed rows cannot take the fused kernel on this architecture (None: they can)."""
    if worker_config.get("attn_implementation") != varlen or not model_config:
        return None
    features = attention_features(model_config)
    max_len = worker_config.get("max_length", 1024)
    why = unfused_reason(features["sliding_window"], features["softcap"], max_len if isinstance(max_len, int) else None)
    if why is None:
        return None
    return (f"attention: {varlen} on {model_config.get('model_type', 'this model')}: {why}; packed rows use exact "
            "per-document attention without it (slower on GPUs); launch.performance.attention chooses another")

"""Translate seed-era config keys into the names today's transformers/TRL expect.

Seed configs were written for older libraries. Rather than fail on them, each
renamed key is moved to its new name with a one-line notice, so a seed YAML runs
unchanged. Pure functions: dict in, (dict, notices, problems) out.
"""
from __future__ import annotations

from typing import Any

# old key -> new key. Values carry over unchanged unless noted in translate().
RENAMED_KEYS = {
    "max_seq_length": "max_length",      # SFTConfig (trl >= 0.20); the seed's script argument
    "max_seq_len": "max_length",         # the seed's YAML spelling
    "evaluation_strategy": "eval_strategy",  # transformers 4.46
    "torch_dtype": "dtype",              # transformers 5
    "no_cuda": "use_cpu",                # transformers 4.34
    "warmup_ratio": "warmup_steps",      # transformers 5: a float in [0, 1) is a ratio
    "model_name": "model_id",            # the seed's script argument for the model
}

# Script arguments only the seed's own training script read; the worker has no use for them.
SEED_SCRIPT_ONLY = {
    "question_key": "read only by the seed's own script; the data set's 'messages' are used",
    "answer_key": "read only by the seed's own script; the data set's 'messages' are used",
}

# Keys the libraries dropped. They had no effect the worker can reproduce; drop with a notice.
REMOVED_KEYS = {
    "overwrite_output_dir": "removed in transformers 5; orchestrate never overwrites checkpoints anyway",
    "logging_dir": "removed in transformers 5; logs go to the run directory",
}

# FSDP1-only keys that FSDP2 (the default) ignores.
FSDP1_ONLY_KEYS = ("backward_prefetch", "forward_prefetch", "use_orig_params", "sync_module_states",
                   "limit_all_gathers", "sharding_strategy", "offload_params")

FSDP_OPTIONS = ("full_shard", "shard_grad_op", "no_shard", "hybrid_shard", "hybrid_shard_zero2",
                "offload", "auto_wrap")


# The worker's script arguments: under a user's own script (launch.script) they are the script's business.
SCRIPT_ARGUMENT_RENAMES = ("model_name",)


def translate(cfg: dict[str, Any], own_script: bool = False) -> tuple[dict[str, Any], list[str], list[str]]:
    """Return ``(translated, notices, problems)`` for the training keys of a config.

    ``own_script``: the job runs the user's script (``launch.script``), whose own arguments
    (``model_name``, ``question_key``, ...) are left as they are.
    """
    out = dict(cfg)
    notices: list[str] = []
    problems: list[str] = []
    for old, new in RENAMED_KEYS.items():
        if old not in out or (own_script and old in SCRIPT_ARGUMENT_RENAMES):
            continue
        value = out.pop(old)
        if new in out and out[new] != value:
            problems.append(f"{old}: set together with its new name '{new}' to a different value; keep only '{new}'")
            continue
        out[new] = value
        notices.append(f"{old} -> {new} (renamed in the current libraries)")
    for old, why in REMOVED_KEYS.items():
        if old in out:
            out.pop(old)
            notices.append(f"{old}: dropped ({why})")
    for key, why in SEED_SCRIPT_ONLY.items():
        if key in out and not own_script:
            out.pop(key)
            notices.append(f"{key}: accepted, no effect ({why})")
    if isinstance(out.get("fsdp_config"), dict):
        out["fsdp_config"] = _strip_fsdp_prefix(out["fsdp_config"], notices)
    fsdp = out.get("fsdp")
    if isinstance(fsdp, (str, list)) and not _is_bool_string(fsdp):
        _translate_fsdp_string(out, fsdp, notices, problems)
    elif isinstance(fsdp, str):
        out["fsdp"] = fsdp.strip().lower() == "true"
    return out, notices, problems


def _is_bool_string(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("true", "false", "")


def _strip_fsdp_prefix(fsdp_config: dict, notices: list[str]) -> dict:
    """accelerate's YAML uses ``fsdp_``-prefixed names; transformers strips them too. The seed's quoted
    ``"false"``/``"true"`` become booleans (a non-empty string is true to Python)."""
    out = {}
    for key, value in fsdp_config.items():
        if isinstance(key, str) and key.startswith("fsdp_"):
            notices.append(f"fsdp_config.{key} -> fsdp_config.{key[5:]}")
            key = key[5:]
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        out[key] = value
    return out


def _translate_fsdp_string(out: dict, fsdp: str | list, notices: list[str], problems: list[str]) -> None:
    """``fsdp: "full_shard auto_wrap offload"`` -> ``fsdp: true`` + ``fsdp_config`` entries."""
    words = fsdp.split() if isinstance(fsdp, str) else [str(w) for w in fsdp]
    words = [w.strip().lower() for w in words if str(w).strip()]
    bad = [w for w in words if w not in FSDP_OPTIONS]
    if bad:
        problems.append(f"fsdp: unknown option(s) {bad}; valid: {list(FSDP_OPTIONS)} or true/false")
        return
    strategies = [w for w in words if w not in ("offload", "auto_wrap")]
    if len(strategies) > 1:
        problems.append(f"fsdp: contradictory sharding strategies {strategies}; choose one")
        return
    if out.get("fsdp_config") is not None and not isinstance(out["fsdp_config"], dict):
        return  # fsdp_config is a JSON file (or a type problem reported later): transformers applies the string
    fsdp_config = dict(out.get("fsdp_config") or {})
    given = str(fsdp_config.get("sharding_strategy") or "").strip().lower()
    if strategies and given and given != strategies[0]:
        problems.append(f"fsdp: {strategies[0]!r} contradicts fsdp_config.sharding_strategy: "
                        f"{fsdp_config['sharding_strategy']}; keep one")
        return
    if "offload" in words and fsdp_config.get("offload_params") is False:
        problems.append("fsdp: 'offload' contradicts fsdp_config.offload_params: false; keep one")
        return
    version = int(fsdp_config.get("version", 2)) if str(fsdp_config.get("version", 2)).isdigit() else 2
    if strategies:
        strategy = strategies[0]
        if version == 2:
            if strategy not in ("full_shard", "shard_grad_op"):
                problems.append(f"fsdp: '{strategy}' has no FSDP2 equivalent; use full_shard or shard_grad_op, "
                                "or set fsdp_config.version: 1")
                return
            fsdp_config.setdefault("reshard_after_forward", strategy == "full_shard")
        else:
            fsdp_config.setdefault("reshard_after_forward", strategy)
    if "offload" in words:
        fsdp_config.setdefault("cpu_offload", True)
    out["fsdp"] = True
    out["fsdp_config"] = fsdp_config
    notices.append(f"fsdp: {' '.join(words)!r} -> fsdp: true + fsdp_config {_short(fsdp_config)} "
                   "(string form is deprecated)")


def _short(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"

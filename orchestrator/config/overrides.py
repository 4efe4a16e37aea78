"""``KEY=VALUE`` overrides and ``--sweep KEY=V1,V2`` from the command line (issue 19).

The way LLaMA-Factory (``learning_rate=1e-5``) and torchtune (``optimizer.lr=2e-5``) take them:
a dotted key reaches into nested sections (``launch.nproc_per_node=1``,
``fsdp_config.cpu_offload=true``), the value is read as YAML (``true``, ``8``, ``null``,
``[a, b]``), and a number in exponent form is a number (YAML 1.1 would keep ``1e-5`` a string).
They are applied to the YAML's mapping *before* validation, so a misspelt key is reported like
one in the file (exit 2, with the closest valid key). Pure functions: text in, values out.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import yaml

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_][A-Za-z0-9_-]*)*$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class Override:
    """One ``KEY=VALUE``: the dotted key, the value as YAML reads it, and the text as typed."""

    key: str
    value: Any
    text: str

    def __str__(self) -> str:
        return f"{self.key}={self.text}"


def read_value(text: str) -> Any:
    """A command-line value as YAML reads it; ``1e-5`` (a string to YAML 1.1) is a float."""
    if _NUMBER.match(text.strip()):
        number = float(text)
        return int(number) if re.fullmatch(r"[+-]?\d+", text.strip()) else number
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text   # e.g. "a: b" unquoted: keep the text, validation judges it


def _split(arg: str, what: str) -> tuple[str, str, list[str]]:
    if "=" not in arg:
        return "", "", [f"{arg}: expected {what} (e.g. learning_rate=1e-5)"]
    key, text = arg.split("=", 1)
    key = key.strip()
    if not _KEY.match(key):
        return key, text, [f"{arg}: '{key}' is not a key (letters, digits, '_', '-', sections joined by '.')"]
    return key, text, []


def parse_overrides(args: list[str]) -> tuple[list[Override], list[str]]:
    """``KEY=VALUE`` arguments -> overrides, and every problem found (a key given twice is one)."""
    out, problems, seen = [], [], set()
    for arg in args:
        key, text, bad = _split(arg, "KEY=VALUE")
        if bad:
            problems += bad
            continue
        if key in seen:
            problems.append(f"{key}: given twice on the command line")
        seen.add(key)
        out.append(Override(key, read_value(text), text))
    return out, problems


def parse_sweeps(args: list[str]) -> tuple[list[tuple[str, list[Override]]], list[str]]:
    """``--sweep KEY=V1,V2,...`` arguments -> ``[(key, [one override per value])]`` and the problems."""
    out, problems, seen = [], [], set()
    for arg in args:
        key, text, bad = _split(arg, "KEY=V1,V2,...")
        if bad:
            problems += bad
            continue
        texts = [t.strip() for t in text.split(",")]
        if key in seen:
            problems.append(f"--sweep {key}: given twice (list every value in one --sweep)")
        elif any(not t for t in texts):
            problems.append(f"--sweep {arg}: an empty value (values are separated by ',')")
        elif len(set(texts)) != len(texts):
            problems.append(f"--sweep {arg}: a value is repeated")
        seen.add(key)
        out.append((key, [Override(key, read_value(t), t) for t in texts]))
    return out, problems


# fsdp_config is a free mapping to SFTConfig; the keys transformers and accelerate read from it. An override of
# a key that is neither in the file nor here, but close to one of these, is a typo (unknown ones pass through).
FSDP_CONFIG_KEYS = ("activation_checkpointing", "auto_wrap_policy", "backward_prefetch", "buffer_dtype",
                    "compute_dtype", "cpu_offload", "cpu_ram_efficient_loading", "forward_prefetch",
                    "limit_all_gathers", "min_num_params", "mixed_precision_policy", "offload_params",
                    "reshard_after_forward", "sharding_strategy", "state_dict_type", "sync_module_states",
                    "transformer_layer_cls_to_wrap", "use_orig_params", "version")


def _misspelt(raw: dict, ov: Override) -> str | None:
    section, _, key = ov.key.partition(".")
    if section != "fsdp_config" or "." in key:
        return None
    present = raw.get("fsdp_config") if isinstance(raw.get("fsdp_config"), dict) else {}
    if key in present or key in FSDP_CONFIG_KEYS:
        return None
    from .schema import closest

    hint = closest(key, [*present, *FSDP_CONFIG_KEYS])
    return f"{ov.key}: unknown key (did you mean 'fsdp_config.{hint}'?)" if hint else None


def apply_overrides(raw: dict, overrides: list[Override]) -> tuple[dict, list[str]]:
    """A copy of the YAML mapping ``raw`` with each override set at its dotted key (sections are
    created as needed); problems where a key goes through a value that is not a section, or
    misspells a known ``fsdp_config`` key (other keys are checked by the validation that follows)."""
    out = copy.deepcopy(raw)
    problems = [p for p in (_misspelt(raw, ov) for ov in overrides) if p]
    for ov in overrides:
        node, parts = out, ov.key.split(".")
        for depth, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                where = ".".join(parts[:depth + 1])
                problems.append(f"{ov} (command line): {where} is {type(nxt).__name__} {nxt!r} in the config, "
                                "not a section")
                break
            node = nxt
        else:
            node[parts[-1]] = ov.value
    return out, problems

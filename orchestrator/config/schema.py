"""Check training keys against the real ``SFTConfig`` dataclass of the installed TRL.

The installed library is the source of truth for which keys exist and what type
each takes, so a TRL upgrade that adds or removes a field needs no change here.
Importing TRL costs a few seconds; only ``validate``/``submit`` pay it.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import types
import typing
from typing import Any

# The worker's own script arguments (train_worker.ScriptArguments) and TrlParser's `env`.
# `dtype` is the dtype the weights are loaded in (the seed passed torch_dtype to from_pretrained).
# `attn_implementation` is passed to from_pretrained (issue 6: the plan sets orchestrate_varlen for packed rows).
SCRIPT_KEYS: dict[str, Any] = {"model_id": str, "dataset_path": str, "dtype": str | None,
                               "attn_implementation": str | None}
PARSER_KEYS: dict[str, Any] = {"env": dict[str, Any]}


@functools.lru_cache(maxsize=1)
def training_fields() -> dict[str, Any]:
    """``{name: type}`` of every ``SFTConfig`` init field (TRL's superset of TrainingArguments)."""
    from trl import SFTConfig

    return {f.name: f.type for f in dataclasses.fields(SFTConfig) if f.init}


# Annotations narrower than what the library accepts at run time.
# `fsdp` is annotated `str | None` but transformers 5 wants `fsdp: true` (see training_args.py).
TYPE_OVERRIDES: dict[str, Any] = {"fsdp": bool | str | None}


def known_keys() -> dict[str, Any]:
    return {**SCRIPT_KEYS, **PARSER_KEYS, **training_fields(), **TYPE_OVERRIDES}


def closest(name: str, candidates) -> str | None:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


def check_value(path: str, value: Any, tp: Any) -> tuple[Any, str | None, str | None]:
    """Check ``value`` against annotation ``tp``.

    Returns ``(value, notice, problem)``: the value possibly coerced (YAML 1.1 reads
    ``2e-4`` as a string; TrlParser would pass that string on unconverted and the
    optimizer would fail hours later), a notice if coerced, a problem if invalid.
    """
    ok, coerced = _matches(value, tp)
    if ok:
        notice = None
        if coerced is not value and type(coerced) is not type(value):
            notice = f"{path}: {value!r} read as {coerced!r} (YAML gave a {type(value).__name__})"
        return coerced, notice, None
    return value, None, f"{path}: expected {_describe(tp)}, got {type(value).__name__} {value!r}"


def _matches(value: Any, tp: Any) -> tuple[bool, Any]:
    if tp is Any or tp is typing.Any:
        return True, value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        # Exact matches first, so "str | None" keeps a string a string.
        for arg in args:
            ok, out = _matches(value, arg)
            if ok and out is value:
                return True, value
        for arg in args:
            ok, out = _matches(value, arg)
            if ok:
                return True, out
        return False, value
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if origin in (list, tuple, set):
        return isinstance(value, (list, tuple)), value
    if origin is dict:
        return isinstance(value, dict), value
    if tp is type(None):
        return value is None, value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value in {m.value for m in tp} or value in tp.__members__, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, value
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if tp in (list, dict):
        return isinstance(value, tp), value
    return True, value  # an annotation we do not model: let the library decide


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if tp is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))

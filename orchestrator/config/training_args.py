"""Build the real ``SFTConfig`` from the training keys, as the worker's ``TrlParser`` will (issue 16.7).

transformers and TRL refuse some combinations only when the arguments are built (``fp16`` with ``bf16``,
``load_best_model_at_end`` with different save and eval strategies, ``lr_scheduler_type:
reduce_lr_on_plateau`` without evaluation, a DeepSpeed config without deepspeed installed, ...). Every rank
would fail at start; validation builds them first and names the keys (exit 2).

Built as the ranks build them, with two differences that keep this host's hardware out of it (the job's
hardware is checked where it runs): ``use_cpu`` is set, so nothing touches a GPU here, and ``tf32`` (a GPU
matmul hint) is left out. The environment is restored afterwards (transformers writes accelerate's variables
into it) and accelerate's process state is reset, so the orchestrator's own process is left as it was.
"""
from __future__ import annotations

import copy
import os
import re
import warnings
from typing import Any

from .schema import PARSER_KEYS, SCRIPT_KEYS

HARDWARE_KEYS = ("tf32",)
MAX_ROUNDS = 5       # each round takes out the keys an error named and builds again, to find the next problem
# Words of transformers' messages that mean a key without spelling it.
_ALIASES = {"evaluation strategy": "eval_strategy", "eval strategy": "eval_strategy", "save strategy": "save_strategy",
            "saving steps": "save_steps", "evaluation steps": "eval_steps"}


def _build(kwargs: dict[str, Any]) -> str | None:
    """None if ``SFTConfig(**kwargs)`` builds, else its error in one line."""
    from trl import SFTConfig

    from transformers.utils import logging as hf_logging

    saved, verbosity = dict(os.environ), hf_logging.get_verbosity()
    try:
        hf_logging.set_verbosity_error()      # its advice is for the ranks' logs, not for validate's output
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # deprecation notes are the schema's business, not problems
            SFTConfig(**copy.deepcopy(kwargs))   # it edits nested dicts (fsdp_config) in place
        return None
    except (ValueError, TypeError, NotImplementedError, ImportError, KeyError, AssertionError, OSError) as e:
        return " ".join(str(e).split())[:400] or type(e).__name__
    finally:
        hf_logging.set_verbosity(verbosity)
        if dict(os.environ) != saved:
            os.environ.clear()
            os.environ.update(saved)
        _reset_accelerate()


def _reset_accelerate() -> None:
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    except Exception:  # noqa: BLE001 - nothing was set up, or an accelerate without this helper
        pass


def _keys_named(message: str, kwargs: dict[str, Any]) -> list[str]:
    """The keys of ``kwargs`` an error message names (``fp16``, ``--bf16``, "save strategy", ...)."""
    text = message.lower()
    named = [k for k in kwargs if re.search(rf"(?<![\w]){re.escape(k.lower())}(?![\w])", text)]
    for words, key in _ALIASES.items():
        if words in text and key in kwargs and key not in named:
            named.append(key)
    first = {k: min([i for i in (text.find(k.lower()), *(text.find(w) for w, a in _ALIASES.items() if a == k))
                     if i >= 0], default=len(text)) for k in named}
    return sorted(named, key=first.get)   # in the order the message names them


def training_args_problems(training: dict[str, Any]) -> list[str]:
    """Every problem ``SFTConfig`` finds in ``training`` (the worker's keys), each starting with its keys."""
    kwargs = {k: v for k, v in training.items()
              if k not in SCRIPT_KEYS and k not in PARSER_KEYS and k not in HARDWARE_KEYS}
    kwargs["use_cpu"] = True
    problems: list[str] = []
    for _ in range(MAX_ROUNDS):
        error = _build(kwargs)
        if error is None:
            break
        keys = [k for k in _keys_named(error, kwargs) if k in training]
        problems.append(f"{', '.join(keys) or 'training arguments'}: {error} (refused by transformers/TRL when "
                        "the training arguments are built)")
        if not keys:
            break
        for key in keys:
            kwargs.pop(key, None)
        kwargs["use_cpu"] = True
    return problems

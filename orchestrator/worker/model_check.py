"""The model folder before anything starts: can it be found, and do its tokenizer and embeddings agree (issue 16.5/16.7).

* :func:`locate`: a local folder, or a Hub id in the local Hugging Face cache. A Hub id that is in no cache
  and cannot be resolved (``HF_HUB_OFFLINE``, no network, not on the Hub) is a problem named before start:
  every rank would otherwise fail to download it, and the socket error behind it read as a transient fault.
* :func:`tokenizer_findings`: the tokenizer as ``AutoTokenizer`` loads it (transformers 5 may *add* a pad
  token its class defines, e.g. ``Qwen2Tokenizer``'s ``<|endoftext|>``, to a folder that names none: one token
  more than the embeddings have, which fails only when the saved model is loaded again with "Padding_idx must
  be within num_embeddings"), a pad token, and a chat template where the rows are conversations.

Used by ``orchestrate validate`` and by the worker at start (:func:`load_tokenizer`). No torch import here.
"""
from __future__ import annotations

import errno
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from .architecture import text_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json")
HUB_TIMEOUT_S = 8.0
_TRUE = ("1", "on", "yes", "true")
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")   # marks the assistant's tokens (assistant_only_loss)


def hub_cache() -> Path:
    """Where huggingface_hub caches models, read from the environment now (as the ranks will)."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cached_folder(model_id: str) -> Path | None:
    """The snapshot folder of a Hub id in the local cache (it holds at least config.json), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_id, "config.json", cache_dir=hub_cache())
    except Exception:  # noqa: BLE001 - an id huggingface_hub refuses (bad characters) is simply not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def _hub_lookup(model_id: str) -> str | None:
    """Why the Hub cannot give ``model_id`` now (None: it can). One request, bounded by HUB_TIMEOUT_S."""
    result: dict[str, str | None] = {}

    def ask() -> None:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        try:
            HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).model_info(model_id, timeout=HUB_TIMEOUT_S / 2)
            result["why"] = None
        except GatedRepoError:
            result["why"] = "it is gated: accept its licence on the Hub and log in (hf auth login)"
        except RepositoryNotFoundError:
            result["why"] = "no such model on the Hub (or it is private: log in with hf auth login)"
        except Exception as e:  # noqa: BLE001 - any failure to reach the Hub, named
            result["why"] = f"the Hub cannot be reached ({type(e).__name__}: {str(e)[:160]})"

    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    worker.join(HUB_TIMEOUT_S)
    return result.get("why", f"the Hub did not answer within {HUB_TIMEOUT_S:g} s")


def locate(model_id: str) -> tuple[Path | None, list[str], list[str]]:
    """``(folder to read, notices, problems)`` for a local folder or a Hub id."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local, [], []
    folder = cached_folder(model_id)
    if folder is not None:
        return folder, [], []
    fix = (f"download it first where the job runs (hf download {model_id}; cache: {hub_cache()}) or point "
           "model_id at a local folder")
    if offline():
        return None, [], [f"model_id: {model_id} is not a local folder and not in the Hugging Face cache, and "
                          f"HF_HUB_OFFLINE is set: {fix}"]
    why = _hub_lookup(model_id)
    if why:
        return None, [], [f"model_id: {model_id} is not a local folder nor in the Hugging Face cache, and {why}: "
                          f"{fix}"]
    return None, [f"model_id: {model_id} is not in the Hugging Face cache here ({hub_cache()}); every node "
                  "downloads it at start"], []


def read_config(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _declared_pad(folder: Path) -> bool:
    """Does the folder itself name a pad token (tokenizer_config.json or special_tokens_map.json)?"""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            if json.loads((folder / name).read_text()).get("pad_token"):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def tokenizer_findings(tok, config: dict[str, Any], folder: Path | str, conversational: bool = False,
                       chat_template_given: bool = False, assistant_only: bool = False
                       ) -> tuple[list[str], list[str]]:
    """``(notices, problems)`` about a loaded tokenizer against the model's ``config.json``."""
    notices, problems = [], []
    cfg = text_config(config)
    rows = cfg.get("vocab_size") if isinstance(cfg.get("vocab_size"), int) else None
    n, pad_id, eos = len(tok), tok.pad_token_id, tok.eos_token
    if rows is not None and n > rows:
        if pad_id is not None and pad_id >= rows and n == rows + 1 and not _declared_pad(Path(folder)):
            problems.append(
                f"model_id: the tokenizer has {n} tokens but the model {rows} embedding rows (config.json vocab_size): "
                f"transformers added the pad token {tok.pad_token!r} as id {pad_id} because {type(tok).__name__} "
                f"defines one and {folder} names none. Fix: set \"pad_token\" in tokenizer_config.json to a token "
                f"the model has (e.g. its eos token {eos!r}), or resize the embeddings "
                "(model.resize_token_embeddings(len(tokenizer))) and save the model again")
        else:
            problems.append(
                f"model_id: the tokenizer has {n} tokens but the model only {rows} embedding rows (config.json "
                f"vocab_size): token ids >= {rows} index past the embeddings. Fix: resize the embeddings "
                "(model.resize_token_embeddings(len(tokenizer))) and save the model again, or use the tokenizer "
                "the model was trained with")
    if tok.pad_token is None and eos is None:
        problems.append(f"model_id: the tokenizer has no pad token, and no eos token to pad with: set \"pad_token\" "
                        f"in {folder}/tokenizer_config.json to a token the model has")
    elif tok.pad_token is None:
        notices.append(f"tokenizer: no pad token; the worker pads with the eos token {eos!r}")
    cfg_pad = cfg.get("pad_token_id")
    if isinstance(cfg_pad, int) and rows is not None and not 0 <= cfg_pad < rows:
        problems.append(f"model_id: config.json pad_token_id {cfg_pad} is outside the {rows} embedding rows (loading "
                        "fails with 'Padding_idx must be within num_embeddings'): set it to a token id below "
                        f"{rows} (e.g. the eos token's) or null")
    template = getattr(tok, "chat_template", None)
    if conversational and not chat_template_given and not template:
        problems.append("model_id: the rows are conversations but the tokenizer has no chat template: add one "
                        "(tokenizer.chat_template), set chat_template_path, or use prompt/completion or text rows")
    elif assistant_only and not chat_template_given and isinstance(template, str) and not _GENERATION.search(template):
        problems.append("assistant_only_loss: the tokenizer's chat template has no {% generation %} block, so no "
                        "token is marked as the assistant's (TRL fails on the first row): use a template with "
                        "one (chat_template_path), or set assistant_only_loss: false")
    return notices, problems


def check_folder(folder: Path, conversational: bool = False, chat_template_given: bool = False,
                 assistant_only: bool = False) -> tuple[list[str], list[str]]:
    """Load the tokenizer of a local model folder as the worker will and check it (validation)."""
    has_tokenizer = any((folder / n).is_file() for n in TOKENIZER_FILES)
    if not has_tokenizer:
        if any(next(folder.glob(g), None) for g in WEIGHT_GLOBS):
            return [], [f"model_id: {folder} has weights but no tokenizer ({', '.join(TOKENIZER_FILES[:2])}); save "
                        "the tokenizer there too (tokenizer.save_pretrained)"]
        return [], []
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - the worker would fail the same way at start
        return [], [f"model_id: the tokenizer in {folder} does not load ({type(e).__name__}: {str(e)[:300]})"]
    return tokenizer_findings(tok, read_config(folder), folder, conversational, chat_template_given, assistant_only)


def load_tokenizer(model_id: str):
    """The worker's tokenizer: ``AutoTokenizer`` (a Hub id that cannot be resolved becomes a FileNotFoundError
    naming the fix, with no socket error behind it to look transient), pad = eos where it has none, and the
    same hard checks as validation (:func:`tokenizer_findings`) raised as one ValueError."""
    from transformers import AutoConfig, AutoTokenizer

    failure = None
    try:
        tok = AutoTokenizer.from_pretrained(model_id)
    except OSError as e:
        if Path(model_id).expanduser().is_dir() or not any(w in str(e).lower() for w in ("connect", "offline",
                                                                                          "cached files")):
            raise
        failure = f"model_id: {model_id} cannot be loaded here: it is not in the Hugging Face cache and the Hub " \
                  f"cannot be reached ({str(e).splitlines()[0]}); download it first (hf download {model_id})"
    if failure:   # raised outside the except block: no socket errno in its context
        raise FileNotFoundError(errno.ENOENT, failure)
    config = AutoConfig.from_pretrained(model_id).to_dict()
    _, problems = tokenizer_findings(tok, config, model_id)
    if problems:
        raise ValueError("; ".join(problems))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok

"""Is a saved Hugging Face folder the model that was trained? The check behind COMPLETED (and ``export``).

Compared with the worker's record (:mod:`.final_record`), exactly and in the saved dtype:

1. the folder's config and tokenizer load, and every token id of the tokenizer has an input
   embedding row (a tokenizer that gained a pad token the model was not resized for is named);
2. the model class the config builds (on the meta device: no memory) finds every parameter in the
   safetensors files, under the names ``from_pretrained`` maps them to (transformers 5 renames some
   keys on save; tied weights such as Gemma's ``lm_head.weight`` are not stored and come from their
   source), with the dtype, shape and digest of the trained tensor (:mod:`.digests`, streamed);
3. with ``load_best_model_at_end``, the trained weights are those of the best checkpoint;
4. optionally, when the model fits ``logits_budget`` bytes, the folder loaded in the dtype the trained
   model computed in, on the same kind of device, gives the trained model's logits on a fixed input.

The verdict: ``verified``; ``mismatch`` (a real difference: the job fails); or ``unverified`` (the
check could not run, or only the logits disagree while every weight is identical: rounding and
computation never fail a job that trained right).
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import digests

VERIFIED, MISMATCH, UNVERIFIED = "verified", "mismatch", "unverified"
LOGITS_BUDGET = 1024 * 2**20          # bytes of weights the optional logits check may load (in compute dtype)
FIXED_INPUT = [[1, 5, 9, 14, 2, 7, 11, 3, 8, 13, 4, 6, 10, 12, 15, 16]]   # token ids every vocabulary has
_ULPS = 8                              # logits tolerance: this many units in the last place of the largest logit


class Mismatch(Exception):
    """The folder is not the trained model (or not usable as one): the job fails."""


def check_folder(folder: str | Path, record: dict | None, logits_budget: int = LOGITS_BUDGET) -> dict:
    """``{"verdict", "reason", "folder", "method", "tensors", "bytes", "seconds", ...}`` for ``folder``."""
    folder, began = Path(folder), time.monotonic()
    out: dict = {"folder": str(folder), "method": "digest", "verdict": VERIFIED, "reason": None}
    try:
        if not record or not isinstance(record.get("tensors"), dict):
            raise digests.NotComparable((record or {}).get("error") or
                                        "the worker recorded no digests of the weights it saved")
        _check(folder, record, out, logits_budget)
    except (Mismatch, digests.Unreadable) as exc:
        out.update(verdict=MISMATCH, reason=str(exc))
    except digests.NotComparable as exc:
        out.update(verdict=UNVERIFIED, reason=str(exc))
    out["seconds"] = round(time.monotonic() - began, 3)
    return out


def _check(folder: Path, record: dict, out: dict, logits_budget: int) -> None:
    if not (folder / "config.json").is_file():
        raise Mismatch(f"{folder} has no config.json")
    paths, weight_map = digests.weight_files(folder)
    if not paths:
        raise Mismatch(f"{folder} holds no *.safetensors weights")
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise Mismatch(f"{folder}: {', '.join(missing)} listed in {digests.INDEX_FILE} but missing")
    # The disk streams while the config, tokenizer and model class load (imports, mostly): the two overlap.
    pool = ThreadPoolExecutor(1)
    streaming = pool.submit(_timed, digests.file_digests, paths, record.get("algorithm") or digests.algorithm())
    try:
        began = time.monotonic()
        config, tokenizer = _load_config_and_tokenizer(folder)
        model = _meta_model(folder, config, tokenizer)
        out["load_s"] = round(time.monotonic() - began, 3)
        files, out["stream_s"] = streaming.result()
    finally:
        pool.shutdown(wait=True)
    if weight_map is not None and set(weight_map) != set(files):
        raise Mismatch(f"{digests.INDEX_FILE} in {folder} lists {len(weight_map)} tensors, the files hold {len(files)}")
    loaded = loaded_tensors(model, files)
    _embedding_rows(folder, model, loaded, tokenizer)
    _compare(loaded, record["tensors"], what="the trained weights")
    out.update(tensors=len(files), bytes=sum(_nbytes(e) for e in files.values()))
    if record.get("best"):
        _compare_best(record, out)
    if record.get("logits"):
        _logits(folder, record["logits"], out, logits_budget, sum(math.prod(e["shape"]) for e in files.values()))


def _timed(fn, *args):
    began = time.monotonic()
    return fn(*args), round(time.monotonic() - began, 3)


def _load_config_and_tokenizer(folder: Path):
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - whatever it is, the folder's config is unusable
        raise Mismatch(f"config.json in {folder} does not load: {type(exc).__name__}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001
        raise Mismatch(f"the tokenizer in {folder} does not load: {type(exc).__name__}: {exc}") from exc
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab, pad = getattr(text, "vocab_size", None), getattr(text, "pad_token_id", None)
    if isinstance(vocab, int):
        if len(tokenizer) > vocab:
            raise Mismatch(_tokenizer_too_big(folder, tokenizer, vocab))
        if isinstance(pad, int) and pad >= vocab:
            raise Mismatch(f"config.json in {folder} has pad_token_id {pad}, outside the model's {vocab} input "
                           f"embeddings (from_pretrained fails: 'Padding_idx must be within num_embeddings'); the "
                           f"tokenizer's pad token is {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}). "
                           f"Set pad_token to a token the model has (e.g. its eos token), then edit the config "
                           f"and submit again")
    return config, tokenizer


def _tokenizer_too_big(folder: Path, tokenizer, rows: int) -> str:
    extra = tokenizer.convert_ids_to_tokens(list(range(rows, min(len(tokenizer), rows + 5))))
    return (f"the tokenizer in {folder} has {len(tokenizer)} tokens but the model has {rows} input embeddings: "
            f"token ids {rows}..{len(tokenizer) - 1} ({', '.join(map(repr, extra))}) have no embedding. The "
            f"tokenizer gained tokens the model was not resized for (transformers adds a pad token to some "
            f"tokenizers that have none); give the tokenizer an existing token as pad_token (e.g. its eos token) "
            f"or resize the model's embeddings, then edit the config and submit again")


def _meta_model(folder: Path, config, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - the folder's config builds no model: from_pretrained fails too
        raise Mismatch(f"config.json in {folder} builds no model: {type(exc).__name__}: {exc}") from exc


def load_names(model, file_keys, model_keys=None) -> tuple[dict[str, str], dict[str, str]]:
    """``({file key: model key}, {file key: converter pattern})`` as ``from_pretrained`` maps a file's keys
    (transformers 5's renames); the identity where transformers offers no mapping. ``model_keys``: the
    model's state-dict keys (default: ``model.state_dict()``'s)."""
    keys = {k: True for k in (model.state_dict() if model_keys is None else model_keys)}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(model) or []
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
    except (ImportError, AttributeError, TypeError):   # an older or newer transformers: no renames known
        return {k: k for k in file_keys}, {}
    names, converted = {}, {}
    prefix = getattr(model, "base_model_prefix", None)
    for key in file_keys:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, keys)
        if renamed not in keys and key in keys:
            renamed, pattern = key, None
        names[key] = renamed
        if pattern is not None:
            converted[key] = pattern
    return names, converted


def tied_keys(model) -> dict[str, str]:
    """``{target: source}`` of the model's tied weights (e.g. ``lm_head.weight`` -> the input embeddings)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        return dict(tied)
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        names = {id(m): n for n, m in model.named_modules()}
        return {f"{names[id(model.get_output_embeddings())]}.weight": f"{names[id(model.get_input_embeddings())]}.weight"}
    return {}


def loaded_tensors(model, files: dict) -> dict:
    """``{model key: file entry}``: what ``from_pretrained`` puts in each of the model's tensors."""
    names, converted = load_names(model, files)
    if converted:
        some = ", ".join(sorted(converted)[:3])
        raise digests.NotComparable(f"{len(converted)} saved tensors are converted when loaded ({some}, ...): "
                                    f"their digests cannot be compared one to one")
    expected = set(model.state_dict())
    loaded = {names[k]: {**v, "name": k} for k, v in files.items()}
    unexpected = sorted(set(loaded) - expected)
    if unexpected:
        raise Mismatch(f"the folder holds tensors its model does not load: {', '.join(unexpected[:5])}")
    for target, source in tied_keys(model).items():   # from_pretrained ties them: a stored target is dropped
        if source in loaded:
            loaded[target] = {**loaded[source], "tied_to": source}
    params = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    absent = sorted(k for k in params if k not in loaded)
    if absent:
        raise Mismatch(f"the folder lacks {len(absent)} of the model's weights ({', '.join(absent[:5])}): "
                       f"from_pretrained would initialize them at random")
    return loaded


def _embedding_rows(folder: Path, model, loaded: dict, tokenizer) -> None:
    names = {id(m): n for n, m in model.named_modules()}
    key = f"{names.get(id(model.get_input_embeddings()), '')}.weight"
    entry = loaded.get(key)
    if entry and entry["shape"] and len(tokenizer) > entry["shape"][0]:
        raise Mismatch(_tokenizer_too_big(folder, tokenizer, entry["shape"][0]))


def _compare(loaded: dict, expected: dict, what: str) -> None:
    """Every tensor equal (dtype, shape, digest) to ``expected``'s; raises Mismatch naming the first few."""
    bad = []
    for key in sorted(set(loaded) | set(expected)):
        have, want = loaded.get(key), expected.get(key)
        if want is None:
            bad.append(f"{key}: not in {what}")
        elif have is None:
            bad.append(f"{key}: in {what}, not in the folder")
        elif (have["dtype"], list(have["shape"])) != (want["dtype"], list(want["shape"])):
            bad.append(f"{key}: {have['dtype']} {have['shape']} saved, {want['dtype']} {want['shape']} in {what}")
        elif have["digest"] != want["digest"]:
            src = f" (tied to {have['tied_to']})" if have.get("tied_to") else ""
            bad.append(f"{key}{src}: its bytes differ from {what}")
    if bad:
        raise Mismatch(f"{len(bad)} tensor(s) differ from {what}: " + "; ".join(bad[:4]) + ("; ..." if len(bad) > 4 else ""))


def _compare_best(record: dict, out: dict) -> None:
    """load_best_model_at_end: the trained (saved) weights must be the best checkpoint's."""
    best = record["best"]
    where = best.get("checkpoint")
    if not where:
        raise digests.NotComparable("load_best_model_at_end is set, but the trainer tracked no best checkpoint "
                                    f"(best_model_checkpoint is null; {best.get('metric') or 'the metric'} "
                                    "was never evaluated at a save?)")
    path = Path(where)
    algo = record.get("algorithm") or digests.algorithm()
    try:
        if (path / digests.SINGLE_FILE).is_file() or (path / digests.INDEX_FILE).is_file():
            theirs = digests.file_digests(digests.weight_files(path)[0], algo)
        elif (path / "pytorch_model_fsdp_0").is_dir():
            theirs = digests.dcp_digests(path / "pytorch_model_fsdp_0", algo)
        else:
            raise digests.NotComparable(f"the best checkpoint {path} holds no model weights this check reads")
    except (digests.Unreadable, OSError) as exc:
        raise digests.NotComparable(f"the best checkpoint {path} cannot be read: {exc}") from exc
    try:
        _compare(theirs, record["tensors"], what=f"the best checkpoint ({path.name})")
    except Mismatch as exc:
        raise Mismatch(f"load_best_model_at_end: the final model is not the best checkpoint's: {exc}") from exc
    out["method"] += "+best"
    out["best_checkpoint"] = str(path)


def _load_like(folder: Path, dtype, attn: str | None):
    """The folder loaded as the trained model computed: its dtype and attention implementation (ours registered)."""
    from transformers import AutoModelForCausalLM

    if attn and attn.startswith("orchestrate_"):
        from .varlen_attn import register

        register()
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **({"attn_implementation": attn} if attn else {}))
    except (ImportError, ValueError):   # that implementation is not available here: transformers' default
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


_ITEMSIZE = {"float64": 8, "int64": 8, "uint64": 8, "complex64": 8, "float32": 4, "int32": 4, "uint32": 4,
             "float16": 2, "bfloat16": 2, "int16": 2, "uint16": 2}


def _nbytes(entry: dict) -> int:
    return math.prod(entry["shape"]) * _ITEMSIZE.get(entry["dtype"], 1)


def _logits(folder: Path, ref: dict, out: dict, budget: int, elements: int) -> None:
    """Like with like: the folder in the dtype the trained model computed in, on the same kind of device."""
    import torch

    dtype, device = ref.get("dtype", "float32"), ref.get("device", "cpu")
    need = elements * _ITEMSIZE.get(dtype, 4)
    if need > budget:
        out["logits"] = {"compared": False, "why": f"{need / 2**20:.0f} MiB of weights in {dtype} is over the "
                                                   f"logits check's {budget / 2**20:.0f} MiB budget"}
        return
    if device != "cpu" and not (device == "cuda" and torch.cuda.is_available()):
        out["logits"] = {"compared": False, "why": f"the trained logits were computed on {device}; no {device} here"}
        return
    model = _load_like(folder, getattr(torch, dtype), ref.get("attn_implementation")).to(device).eval()
    with torch.no_grad():
        got = model(input_ids=torch.tensor(ref["input_ids"], device=device)).logits.float().cpu()
    want = torch.tensor(ref["logits"]).reshape(ref["shape"])
    if list(got.shape) != list(want.shape):
        raise Mismatch(f"the folder's logits have shape {list(got.shape)}, the trained model's {list(want.shape)}")
    diff = float((got - want).abs().max())
    tol = _ULPS * torch.finfo(getattr(torch, dtype)).eps * max(1.0, float(want.abs().max()))
    out["method"] += "+logits"
    out["logits"] = {"compared": True, "max_abs_diff": diff, "tolerance": tol, "dtype": dtype, "device": device}
    if not diff <= tol:
        raise digests.NotComparable(
            f"every weight is identical to the trained ones, but the folder's logits ({dtype}, {device}) differ from "
            f"the trained model's by {diff:.3g} (over {tol:.3g}): the folder's config or code computes differently")

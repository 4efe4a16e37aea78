"""``orchestrate_varlen``: per-document attention for packed (padding-free) rows, registered with transformers.

TRL's padding-free collator (``packing=True`` with ``packing_strategy="bfd"``, or ``padding_free=True``)
concatenates a micro-batch into one row and passes the document boundaries as ``cu_seq_lens_q/k`` and
``max_length_q/k`` (and restarts ``position_ids`` at 0 for each document). transformers' ``sdpa`` turns that
into a dense ``T x T`` block-diagonal mask: correct, but attention then runs over the whole packed row
and SDPA keeps a ``T x T`` bias per layer for backward (the seed's "packed" variant: slower than no packing).
``flash_attention_2`` needs the ``flash-attn`` package. This implementation needs neither:

* on CUDA with PyTorch's own varlen kernel (``torch.nn.attention.varlen.varlen_attn``, flash-attention
  inside PyTorch, bf16/fp16): one call over the packed row with the document boundaries;
* otherwise (CPU, older torch, fp32): causal SDPA per document, so no token attends across a boundary and
  no ``T x T`` mask exists. Exactly the unpacked computation, document by document.

Batches that are not packed (a 2-D padding mask, or several rows) go to transformers' ``sdpa`` with the
same mask it would have built itself.

Sliding windows (Mistral, Phi-3, Gemma 2/3) and Gemma 2's attention logit soft-capping are honoured on every
path: a banded mask where a window is shorter than the document, attention written out (as transformers'
``eager``) where logits are soft-capped. The fused CUDA kernel is used only where it is exact; elsewhere a
notice says why the slower path runs (:func:`unfused_reason`). Register before ``from_pretrained(attn_implementation=NAME)``::

    from orchestrator.worker.varlen_attn import NAME, register
    register()
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import time

import torch
import torch.nn.functional as F

from . import channel
from .architecture import unfused_reason

NAME = "orchestrate_varlen"
log = logging.getLogger(__name__)
_state: dict = {"cuda_kernel_failed": False, "said": set()}


def register() -> str:
    """Make ``attn_implementation=NAME`` valid in transformers (idempotent); returns NAME."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    # Like flash attention: no mask at all when nothing is padded (packed rows carry cu_seq_lens),
    # else the 2-D padding mask, which the fallback below turns into SDPA's 4-D mask.
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME


@functools.lru_cache(maxsize=1)
def _cuda_varlen():
    """``(varlen_attn, {kwarg: value})`` for the installed torch, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    extra = {}
    if "is_causal" in params:          # torch 2.10/2.11
        extra["is_causal"] = True
    elif "window_size" in params:      # later: causal is a (-1, 0) window
        extra["window_size"] = (-1, 0)
    else:
        return None
    return varlen_attn, extra, "enable_gqa" in params


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document starts (``position_ids == 0``) plus the row length, int32, for one packed row."""
    pos = position_ids.reshape(-1)
    starts = (pos == 0).nonzero().flatten()
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    return torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)


def _segments(cu: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu.tolist()
    return [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]


def _allowed(q_len: int, kv_len: int, window: int | None, device) -> torch.Tensor:
    """[q, kv] bool: causal (the queries are the last ``q_len`` of ``kv_len`` positions) and, with a sliding
    ``window``, only the last ``window`` keys (transformers' rule: ``kv > q - window``)."""
    q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    kv = torch.arange(kv_len, device=device)[None, :]
    allowed = kv <= q
    if window is not None:
        allowed = allowed & (kv > q - window)
    return allowed


def _eager(query, key, value, allowed, scaling, dropout, softcap):
    """[B, H, T, d] -> [B, T, H, d]: attention written out, for what SDPA cannot do (logit soft-capping),
    as transformers' eager implementation computes it (softmax in float32)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def _per_document(query, key, value, cu, scaling, dropout, window=None, softcap=None):
    """[1, H, T, d] inputs -> [1, T, H, d]: each document on its own (causal SDPA; a banded mask where a sliding
    window binds; written-out attention with logit soft-capping)."""
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for s, e in _segments(cu):
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        binds = window is not None and e - s > window
        if softcap is not None:
            outs.append(_eager(q, k, v, _allowed(e - s, e - s, window, q.device), scaling, dropout, softcap))
            continue
        mask = _allowed(e - s, e - s, window, q.device) if binds else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                             scale=scaling, enable_gqa=gqa)
        outs.append(out.transpose(1, 2))
    return torch.cat(outs, dim=1).contiguous()


def _cuda_varlen_attention(query, key, value, cu, max_len, scaling):
    fn, extra, has_gqa = _cuda_varlen()
    q = query[0].transpose(0, 1)               # [T, H, d]
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if has_gqa:
            extra = {**extra, "enable_gqa": True}
        else:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
    cu = cu.to(device=q.device, dtype=torch.int32)
    out = fn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, scale=scaling, **extra)
    if isinstance(out, tuple):
        out = out[0]
    return out.unsqueeze(0)                    # [1, T, H, d]


def _padded(module, query, key, value, attention_mask, dropout, scaling, window, softcap, **kwargs):
    """Not packed: what transformers' ``sdpa`` (or ``eager``, with soft-capping) would do, with the 4-D mask it
    would have built (padding, causal, sliding window)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    mask = attention_mask
    needs_band = (window is not None and kv_len > window) or softcap is not None
    if (mask is not None and mask.dim() == 2) or (mask is None and needs_band):
        allowed = _allowed(q_len, kv_len, window, query.device)[None, None]
        if mask is not None:
            allowed = allowed & mask[:, None, None, :].to(torch.bool)
            # A query with no visible key (left padding) would give NaN; let it see itself (its loss is masked).
            allowed = allowed | torch.eye(q_len, kv_len, dtype=torch.bool, device=query.device)[None, None]
        mask = allowed
    if softcap is not None:
        if mask is not None and mask.dtype != torch.bool:   # an additive 4-D mask from elsewhere
            mask = mask > torch.finfo(mask.dtype).min / 2
        return _eager(query, key, value, mask, scaling, dropout, softcap), None
    for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids"):
        kwargs.pop(k, None)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, **kwargs):
    """transformers attention interface: q [B, H, T, d], k/v [B, KV, T, d] -> ([B, T, H, d], None).

    ``sliding_window`` (Mistral, Phi-3, Gemma 2/3, Qwen2 with windows) and ``softcap`` (Gemma 2's
    attention logit soft-capping) are honoured on every path, exactly as transformers' own masks do."""
    cu = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    packed_row = attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
    if packed_row and cu is None and position_ids is not None and position_ids.shape[-1] == query.shape[2]:
        cu = cu_seqlens_from_position_ids(position_ids)
    if not packed_row or cu is None:
        return _padded(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap,
                       **kwargs)
    if (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0
            and _cuda_varlen() is not None and not _state["cuda_kernel_failed"]):
        max_len = kwargs.get("max_length_q")
        if not isinstance(max_len, int):
            max_len = int((cu[1:] - cu[:-1]).max())
        why = unfused_reason(sliding_window, softcap, max_len)
        if why is None:
            try:
                return _cuda_varlen_attention(query, key, value, cu, max_len, scaling), None
            except (RuntimeError, NotImplementedError, TypeError) as e:  # unsupported GPU/head dim/dtype
                if is_oom(e):
                    raise  # an OOM is an OOM wherever it is raised: the slow path would only hide it
                _state["cuda_kernel_failed"] = True
                fell_back(f"orchestrate_varlen: torch varlen_attn failed ({type(e).__name__}: {str(e)[:200]}); "
                          "this job uses the slower per-document SDPA from now on")
        elif why not in _state["said"]:
            _state["said"].add(why)
            fell_back(f"orchestrate_varlen: {why}: these layers use exact per-document attention without the "
                      "fused varlen kernel (slower)")
    return _per_document(query, key, value, cu, scaling, dropout, sliding_window, softcap), None


def is_oom(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (a RuntimeError) or an allocator message saying so."""
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def fell_back(message: str) -> None:
    """Say it loudly, once: in the log and as a notice record that ``orchestrate status`` shows."""
    log.warning(message)
    run_dir = os.environ.get(channel.ENV_RUN_DIR)
    if run_dir:
        try:
            channel.append_jsonl(os.path.join(run_dir, channel.PROGRESS_FILE), {
                "event": "notice", "attempt": int(os.environ.get(channel.ENV_ATTEMPT) or 1), "time": time.time(),
                "rank": int(os.environ.get("RANK", "0")), "message": message})
        except OSError:
            pass


def kernel_in_use(device: str | torch.device) -> str:
    """Which path packed rows take on ``device`` (for logs and the benchmark)."""
    dev = torch.device(device)
    if dev.type == "cuda" and _cuda_varlen() is not None and not _state["cuda_kernel_failed"]:
        return "torch varlen_attn (flash, one call per packed row)"
    return "per-document SDPA"

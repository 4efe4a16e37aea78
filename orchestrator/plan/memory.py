"""Per-GPU memory of a full fine-tuning job, estimated before it starts, and a chooser that makes it fit.

Pure and cheap: no torch import. Inputs are the model's ``config.json`` (as a :class:`ModelShape`) and
a :class:`Workload` (sequence length, micro-batch, world size, dtypes, FSDP, optimizer, activation
checkpointing, CPU offload, attention path). Output is an :class:`Estimate` in bytes, split into the
parts that make the peak, so ``--dry-run`` can say *why* a job fits or not.

The model of the peak (Llama-style decoder; FSDP2 as accelerate sets it up):

* **State** (sharded over the FSDP world; whole per rank under DDP/single): weights, gradients and
  optimizer state. Under FSDP with bf16/fp16 mixed precision accelerate upcasts the parameters to an
  fp32 master copy, so weights and gradients take 4 bytes per parameter and AdamW's two moments 8;
  without mixed precision they take the load dtype's size. ``foreach`` AdamW (``adamw_torch``) also
  allocates temporaries the size of the (local) parameters during ``step()``; the fused one does not.
* **Activations** saved for backward, per token per decoder layer, with ``b`` the compute dtype's
  bytes, ``h`` hidden, ``i`` intermediate, ``H``/``KV`` heads, ``d`` head dim (measured on CPU with
  saved-tensor hooks, see ``tests/test_memory.py``)::

      2 x (4h + 2bh)            two RMSNorms: fp32 copy of the input, normalised input, output
      2b*H*d + 2b*KV*d + 4H     attention: q, k, v (GQA kept; 2b*H*d each when k/v are repeated), output, lse
      4b*i                      SwiGLU MLP: gate, silu(gate), up, gate*up

  With activation checkpointing only each layer's input (``b*h``) is kept and one layer is recomputed
  during backward. SDPA given a dense mask (padded batches, or packed rows without a varlen kernel)
  also keeps a ``T x T`` bias per layer: that is what made the seed's packed variant slow and large.
* **Logits**: TRL >= 1.16 scores the LM head in tiles (4096 tokens x 32768 vocab, fp32) and never holds
  ``tokens x vocab``; ``logits="full"`` models a trainer that does (bf16 logits + fp32 copy + fp32 grad).
* **Transients**: under FSDP the all-gathered (compute dtype) parameters and unsharded gradients of about
  two decoder layers and the root (embeddings, LM head); one layer's worth of backward workspace.

The peak is the larger of the backward phase (state without most gradients + all activations) and the
optimizer step (state + step temporaries). ``fits`` compares it with the GPU's memory less a safety
margin and a fixed reserve for the CUDA context, NCCL and allocator fragmentation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from ..config.performance import SAFETY_MARGIN

GiB = 1024 ** 3
TOKEN_TILE = 4096          # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
VOCAB_TILE = 32768         # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
RESERVE_GIB = 2.0          # CUDA context, NCCL buffers, allocator fragmentation
EFFICIENT_MICRO_BATCH_TOKENS = 8192  # below this many tokens per micro-batch, prefer checkpointing to shrinking


@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs from a decoder-only model's ``config.json``."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    model_type: str = "llama"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelShape":
        """From a ``config.json`` mapping; ``KeyError`` names the first missing key."""
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), Mapping) else cfg
        heads = int(text["num_attention_heads"])
        return cls(
            hidden_size=int(text["hidden_size"]), intermediate_size=int(text["intermediate_size"]),
            num_hidden_layers=int(text["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or heads), vocab_size=int(text["vocab_size"]),
            head_dim=int(text["head_dim"]) if text.get("head_dim") else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            attention_bias=bool(text.get("attention_bias", False)),
            model_type=str(cfg.get("model_type", "llama")))

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def layer_params(self) -> int:
        h, H, KV, d = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.d
        attn = h * H * d + 2 * h * KV * d + H * d * h + ((H + 2 * KV) * d if self.attention_bias else 0)
        return attn + 3 * h * self.intermediate_size + 2 * h

    @property
    def root_params(self) -> int:
        """Embeddings, LM head (unless tied) and the final norm: FSDP's root unit."""
        emb = self.vocab_size * self.hidden_size
        return emb * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    @property
    def params(self) -> int:
        return self.num_hidden_layers * self.layer_params + self.root_params

    def activation_bytes_per_token_layer(self, compute_bytes: int, gqa_kept: bool = True) -> int:
        """Bytes saved for backward per token by one decoder layer without checkpointing (see module doc)."""
        h, i, H, KV, d, b = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                             self.num_key_value_heads, self.d, compute_bytes)
        norms = 2 * (4 * h + 2 * b * h)
        kv = 2 * b * (KV if gqa_kept else H) * d
        attn = 2 * b * H * d + kv + 4 * H
        return norms + attn + 4 * b * i


@dataclass(frozen=True)
class Workload:
    """How the model is trained, per rank."""

    seq_len: int
    micro_batch: int
    world: int = 1                 # FSDP shard count (ranks); DDP/single keep whole copies
    fsdp: bool = True
    mixed_precision: bool = True   # bf16/fp16 autocast or FSDP param_dtype
    load_bytes: int = 4            # bytes per parameter as loaded (fp32 4, bf16 2)
    optimizer: str = "adamw_torch_fused"
    checkpointing: bool = False
    cpu_offload: bool = False
    packed: bool = True            # padding-free packed rows (tokens = micro_batch x seq_len exactly)
    attention: str = "varlen"      # "varlen" (per-document kernel) or "dense_mask" (SDPA with a T x T mask)
    logits: str = "chunked"        # "chunked" (TRL's tiled LM head) or "full"

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch; for padded batches the worst case (every row at seq_len)."""
        return self.seq_len * self.micro_batch


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU at the peak, and its parts."""

    weights: int
    grads: int
    optimizer: int
    optimizer_step_temp: int
    activations: int
    logits: int
    transient: int
    peak: int
    phase: str                     # "backward" or "optimizer step"
    host_offload: int = 0          # CPU offload: this rank's weights, grads and optimizer state in host memory

    def gib(self) -> dict[str, float]:
        return {k: round(v / GiB, 2) for k, v in asdict(self).items() if isinstance(v, int)}


def _optimizer_factors(name: str) -> tuple[float, float]:
    """(state bytes per master byte, step temporaries per master byte) for HF ``optim`` names."""
    name = name.lower()
    if "8bit" in name:
        return 0.5, 0.0            # two 1-byte moments per parameter against a 4-byte master
    if "adafactor" in name:
        return 0.05, 0.0           # factored second moment
    if "sgd" in name:
        return 0.0, 0.0
    if "adam" in name or "lion" in name:
        temp = 0.0 if "fused" in name else 1.0   # foreach AdamW: sqrt(exp_avg_sq) for every parameter
        return (1.0 if "lion" in name else 2.0), temp
    return 2.0, 1.0                # unknown: assume AdamW-like, foreach


def estimate(shape: ModelShape, w: Workload) -> Estimate:
    """Peak per-GPU bytes of one training step (steady state, optimizer state allocated)."""
    b = 2 if w.mixed_precision or w.load_bytes == 2 else 4
    master = 4 if (w.mixed_precision and w.fsdp) else w.load_bytes
    shard = max(1, w.world) if w.fsdp else 1
    P, L, T = shape.params, shape.num_hidden_layers, w.tokens
    state_factor, temp_factor = _optimizer_factors(w.optimizer)

    on_gpu = 0 if (w.cpu_offload and w.fsdp) else 1
    host = (1 - on_gpu) * int((2 + state_factor + temp_factor) * master * P) // shard
    weights = on_gpu * master * P // shard
    grads = on_gpu * master * P // shard
    optimizer = on_gpu * int(state_factor * master * P) // shard
    step_temp = on_gpu * int(temp_factor * master * P) // shard

    transient = 0
    if w.fsdp:  # all-gathered compute-dtype params + unsharded grads: ~2 layers and the root unit
        transient += 2 * b * (2 * shape.layer_params + shape.root_params)
    else:
        if w.world > 1:
            transient += master * P        # DDP gradient buckets
        if w.mixed_precision and master == 4:
            transient += b * P             # autocast's cached low-precision weight copies

    per_layer = shape.activation_bytes_per_token_layer(b, gqa_kept=w.attention == "varlen") * T
    if w.attention == "dense_mask":
        per_layer += b * T * (T if w.packed else w.seq_len)   # SDPA's T x T bias, kept per layer
    head = (4 * shape.hidden_size + 2 * b * shape.hidden_size) * T + b * shape.hidden_size * T  # final norm, embed out
    if w.checkpointing:
        activations = L * b * shape.hidden_size * T + per_layer + head   # layer inputs + one recomputed layer
    else:
        activations = L * per_layer + head
    workspace = per_layer                                             # backward of one layer
    if w.logits == "full":
        logits = T * shape.vocab_size * (b + 4 + 4)
    else:
        logits = 2 * min(T, TOKEN_TILE) * min(shape.vocab_size, VOCAB_TILE) * (b + 4)

    backward = weights + optimizer + activations + workspace + logits + transient + grads // max(1, L)
    step = weights + grads + optimizer + step_temp
    peak, phase = (backward, "backward") if backward >= step else (step, "optimizer step")
    return Estimate(weights=weights, grads=grads, optimizer=optimizer, optimizer_step_temp=step_temp,
                    activations=activations + workspace, logits=logits, transient=transient, peak=peak, phase=phase,
                    host_offload=host)


def usable_bytes(gpu_memory_gib: float, margin: float = SAFETY_MARGIN, reserve_gib: float = RESERVE_GIB) -> int:
    return int(gpu_memory_gib * GiB * (1 - margin) - reserve_gib * GiB)


@dataclass(frozen=True)
class Choice:
    """What the chooser settled on, and why."""

    fits: bool
    checkpointing: bool
    cpu_offload: bool
    micro_batch: int
    grad_accum: int
    estimate: Estimate
    usable: int
    reason: str
    tried: tuple[str, ...] = field(default=())


def choose(shape: ModelShape, w: Workload, gpu_memory_gib: float, *, grad_accum: int = 1,
           checkpointing: bool | None = None, cpu_offload: bool | None = None, shrink_micro_batch: bool = True,
           margin: float = SAFETY_MARGIN) -> Choice:
    """The fastest settings that fit, trying in order of cost:

    1. no checkpointing at the given micro-batch;
    2. no checkpointing at a smaller micro-batch (global batch kept with gradient accumulation) while a
       micro-batch still holds ``EFFICIENT_MICRO_BATCH_TOKENS`` tokens;
    3. checkpointing, micro-batch halved down to 1;
    4. the same with CPU offload of parameters, gradients and optimizer state (FSDP only).

    ``checkpointing``/``cpu_offload`` fixed to True/False (the user said so) restrict the search.
    """
    usable = usable_bytes(gpu_memory_gib, margin)
    ckpts = [False, True] if checkpointing is None else [checkpointing]
    offloads = [False, True] if cpu_offload is None else [cpu_offload]
    if not w.fsdp:
        offloads = [o for o in offloads if not o] or [False]
    candidates: list[tuple[bool, bool, int]] = []
    mbs = [w.micro_batch]
    if shrink_micro_batch:
        mb = w.micro_batch
        while mb > 1:
            mb = max(1, mb // 2)
            mbs.append(mb)
    for off in offloads:
        for ck in ckpts:
            for mb in mbs:
                if not ck and mb != w.micro_batch and mb * w.seq_len < EFFICIENT_MICRO_BATCH_TOKENS and True in ckpts:
                    continue   # checkpointing at an efficient micro-batch beats a tiny one without
                candidates.append((ck, off, mb))
    tried = []
    last = None
    for ck, off, mb in candidates:
        est = estimate(shape, replace(w, checkpointing=ck, cpu_offload=off, micro_batch=mb))
        tried.append(f"checkpointing={'on' if ck else 'off'} offload={'on' if off else 'off'} micro_batch={mb}: "
                     f"{est.peak / GiB:.1f} GiB")
        last = (ck, off, mb, est)
        if est.peak <= usable:
            accum = grad_accum * (w.micro_batch // mb) if mb != w.micro_batch else grad_accum
            why = (f"fits: {est.peak / GiB:.1f} GiB of {usable / GiB:.1f} GiB usable "
                   f"({gpu_memory_gib:.0f} GiB less {int(margin * 100)}% and {RESERVE_GIB:g} GiB reserve)")
            return Choice(True, ck, off, mb, accum, est, usable, why, tuple(tried))
    ck, off, mb, est = last
    why = (f"cannot fit: at best {min_peak(shape, w, candidates) / GiB:.1f} GiB per GPU against "
           f"{usable / GiB:.1f} GiB usable ({gpu_memory_gib:.0f} GiB less {int(margin * 100)}% and "
           f"{RESERVE_GIB:g} GiB reserve), even with activation checkpointing"
           + (", CPU offload" if True in offloads else "") + " and micro-batch 1")
    return Choice(False, ck, off, mb, grad_accum, est, usable, why, tuple(tried))


def min_peak(shape: ModelShape, w: Workload, candidates) -> int:
    return min(estimate(shape, replace(w, checkpointing=c, cpu_offload=o, micro_batch=m)).peak
               for c, o, m in candidates)

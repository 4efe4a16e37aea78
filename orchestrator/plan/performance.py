"""Fast training defaults the plan chooses, each shown by ``--dry-run`` and each switchable off.

Pure (no torch import). ``launch.performance`` is validated by :mod:`orchestrator.config.performance`;
:func:`plan_performance` turns it, the worker config, the device and the topology into worker-config keys plus a record of
every choice (value, where it came from, why) and the memory estimate.

Precedence for every choice: a key the user set in the training YAML (``packing``, ``optim``,
``use_liger_kernel``, ``torch_compile``, ``activation_checkpointing``/``gradient_checkpointing``,
``fsdp_config.activation_checkpointing``/``cpu_offload``, ``attn_implementation``) wins; then
``launch.performance.<switch>: true|false``; then the default (``auto``):

==========================  ==========================================================================
switch                      auto (the default)
==========================  ==========================================================================
packing                     on: TRL BFD packing, padding-free rows with per-document boundaries
attention                   ``orchestrate_varlen`` when rows are padding-free (see worker/varlen_attn.py)
activation_checkpointing    off when the memory estimate fits the GPU (or on CPU); else on
cpu_offload                 off unless nothing else fits (FSDP only)
micro_batch                 may shrink only to fit, with gradient accumulation keeping the global batch
fused_adamw                 ``optim: adamw_torch_fused``
liger                       ``use_liger_kernel: true`` on CUDA when ``liger-kernel`` is installed
compile                     off: packed rows change length every step (recompiles); ``true`` to try
==========================  ==========================================================================
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from ..config.performance import PerformanceSettings
from . import memory

VARLEN = "orchestrate_varlen"  # == varlen_attn.NAME (not imported: that module imports torch)


def _pick(name: str, value: Any, source: str, why: str) -> dict[str, Any]:
    return {"name": name, "value": value, "source": source, "why": why}


def _fsdp_config(training: Mapping[str, Any]) -> dict[str, Any]:
    fc = training.get("fsdp_config")
    return dict(fc) if isinstance(fc, dict) else {}


def _truthy(v: Any) -> bool:
    return str(v).lower() == "true" if not isinstance(v, bool) else v


def _user_attention(training: Mapping[str, Any]) -> str | None:
    mik = training.get("model_init_kwargs")
    if isinstance(mik, dict) and mik.get("attn_implementation"):
        return str(mik["attn_implementation"])
    return training.get("attn_implementation")


def _load_bytes(training: Mapping[str, Any]) -> int:
    mik = training.get("model_init_kwargs") if isinstance(training.get("model_init_kwargs"), dict) else {}
    dtype = str(mik.get("dtype") or mik.get("torch_dtype") or training.get("dtype") or "float32")
    return 2 if dtype in ("bfloat16", "bf16", "float16", "fp16") else 4


def plan_performance(training: dict[str, Any], settings: PerformanceSettings, *, device: str, world: int,
                     fsdp: bool, gpu_memory_gib: float | None, liger_installed: bool,
                     model_shape: memory.ModelShape | None, model_source: str
                     ) -> tuple[dict[str, Any], list[str], list[str]]:
    """Apply the performance defaults to ``training`` (changed in place).

    Returns ``(record, notices, problems)``; ``record`` is what the plan keeps and ``--dry-run`` prints:
    ``{"choices": [...], "memory": {...}}``. A problem means the job cannot fit: nothing starts.
    """
    choices: list[dict[str, Any]] = []
    notices: list[str] = []
    problems: list[str] = []
    cuda = device == "cuda"
    fc = _fsdp_config(training)

    # --- packing ----------------------------------------------------------------------------------
    if "packing" in training:
        packing = bool(training["packing"])
        choices.append(_pick("packing", packing, "config", "packing set in the training config"))
    elif settings.packing is False:
        packing = False
        choices.append(_pick("packing", False, "launch.performance", "switched off"))
    else:
        packing = True
        training["packing"] = True
        choices.append(_pick("packing", True, "default", "BFD packing into padding-free rows: no pad tokens, "
                                                       "documents kept apart by the attention below"))
    strategy = training.get("packing_strategy", "bfd")
    padding_free = bool(training.get("padding_free")) or (packing and strategy in ("bfd", "bfd_split"))

    # --- attention ----------------------------------------------------------------------------------
    user_attn = _user_attention(training)
    if user_attn:
        attention = user_attn
        choices.append(_pick("attention", attention, "config", "attn_implementation set in the training config"))
        if padding_free and attention in ("sdpa", "eager"):
            notices.append(f"attention: {attention} on padding-free rows builds a dense T x T mask per batch "
                           f"(correct but slow); {VARLEN} is the fast path")
    elif settings.attention != "auto":
        attention = settings.attention
        training["attn_implementation"] = attention
        choices.append(_pick("attention", attention, "launch.performance", "set in launch.performance.attention"))
    elif padding_free:
        attention = VARLEN
        training["attn_implementation"] = VARLEN
        choices.append(_pick("attention", VARLEN, "default",
                             "per-document attention on packed rows: torch varlen_attn (flash) on CUDA, "
                             "causal SDPA per document elsewhere"))
    else:
        attention = "sdpa"
        choices.append(_pick("attention", "sdpa", "default", "rows are padded, not packed: transformers' SDPA"))

    # --- optimizer, liger, compile --------------------------------------------------------------------
    if "optim" in training:
        optim = str(training["optim"])
        choices.append(_pick("fused_adamw", optim, "config", "optim set in the training config"))
    elif settings.fused_adamw is False:
        optim = training["optim"] = "adamw_torch"
        choices.append(_pick("fused_adamw", optim, "launch.performance", "switched off"))
    else:
        optim = training["optim"] = "adamw_torch_fused"
        choices.append(_pick("fused_adamw", optim, "default", "one fused kernel per step, no foreach temporaries"))

    if "use_liger_kernel" in training:
        choices.append(_pick("liger", bool(training["use_liger_kernel"]), "config", "use_liger_kernel set in the "
                                                                                  "training config"))
    elif settings.liger is True:
        if not cuda:
            problems.append("launch.performance.liger: true needs a CUDA plan (Liger's kernels are Triton)")
        elif not liger_installed:
            problems.append("launch.performance.liger: true, but liger-kernel is not installed "
                            "(pip install liger-kernel)")
        training["use_liger_kernel"] = True
        choices.append(_pick("liger", True, "launch.performance", "switched on"))
    elif settings.liger == "auto" and cuda and liger_installed:
        training["use_liger_kernel"] = True
        choices.append(_pick("liger", True, "default", "liger-kernel is installed: fused RMSNorm, SwiGLU, RoPE"))
    else:
        why = ("switched off" if settings.liger is False else
               "no GPU" if not cuda else "liger-kernel not installed (optional: pip install liger-kernel)")
        choices.append(_pick("liger", False, "launch.performance" if settings.liger is False else "default", why))

    if "torch_compile" in training:
        choices.append(_pick("compile", bool(training["torch_compile"]), "config", "torch_compile set in the "
                                                                                "training config"))
    elif settings.compile is True:
        training["torch_compile"] = True
        choices.append(_pick("compile", True, "launch.performance", "switched on"))
    else:
        why = ("switched off" if settings.compile is False else
               "CPU plan" if not cuda else
               "packed rows change length every step (recompiles); set launch.performance.compile: true to try")
        choices.append(_pick("compile", False, "launch.performance" if settings.compile is False else "default", why))

    # --- memory: activation checkpointing, CPU offload, micro-batch -------------------------------------
    ckpt_keys = [k for k in ("activation_checkpointing", "gradient_checkpointing") if training.get(k) is not None]
    user_ckpt: bool | None = None
    if fsdp and "activation_checkpointing" in fc:
        user_ckpt = _truthy(fc["activation_checkpointing"]) or any(bool(training[k]) for k in ckpt_keys)
    elif ckpt_keys:
        user_ckpt = bool(training[ckpt_keys[0]])
    fixed_ckpt = user_ckpt if user_ckpt is not None else (
        settings.activation_checkpointing if isinstance(settings.activation_checkpointing, bool) else None)
    ckpt_source = "config" if user_ckpt is not None else (
        "launch.performance" if fixed_ckpt is not None else "default")

    user_offload = _truthy(fc["cpu_offload"]) if fsdp and "cpu_offload" in fc else None
    fixed_offload = user_offload if user_offload is not None else (
        settings.cpu_offload if isinstance(settings.cpu_offload, bool) else None)
    if not fsdp:
        fixed_offload = False
    offload_source = "config" if user_offload is not None else (
        "launch.performance" if isinstance(settings.cpu_offload, bool) else "default")

    micro = int(training.get("per_device_train_batch_size", 8))
    accum = int(training.get("gradient_accumulation_steps", 1))
    seq = training.get("max_length", 1024)
    seq = 1024 if seq is None else int(seq)
    fp16 = bool(training.get("fp16"))
    bf16 = training.get("bf16")
    mixed = fp16 or bool(bf16) or bf16 is None  # TRL's SFTConfig: bf16 defaults to true unless fp16
    work = memory.Workload(seq_len=seq, micro_batch=micro, world=world, fsdp=fsdp, mixed_precision=mixed,
                           load_bytes=_load_bytes(training), optimizer=optim, packed=padding_free,
                           attention="varlen" if attention == VARLEN or attention.startswith("flash") else "dense_mask")
    mem: dict[str, Any] = {"model": model_source, "device": device, "workload": {
        "tokens_per_micro_batch": work.tokens, "seq_len": seq, "micro_batch": micro, "world": world,
        "fsdp": fsdp, "mixed_precision": mixed, "optimizer": optim, "attention": work.attention}}
    ckpt, offload, new_micro = fixed_ckpt, fixed_offload, micro
    if model_shape is not None:
        mem["params"] = model_shape.params
    if not cuda:
        ckpt = False if ckpt is None else ckpt
        offload = False if offload is None else offload
        why_ckpt = "CPU plan: host memory, recompute only costs time" if ckpt_source == "default" else "as set"
        if model_shape is not None:
            est = memory.estimate(model_shape, replace(work, checkpointing=bool(ckpt), cpu_offload=bool(offload)))
            mem["estimate_gib"] = est.gib()
            mem["verdict"] = f"{est.peak / memory.GiB:.2f} GiB per rank (host memory; not checked)"
        else:
            mem["verdict"] = "no estimate: " + model_source
    elif model_shape is None or gpu_memory_gib is None:
        ckpt = True if ckpt is None else ckpt
        offload = False if offload is None else offload
        unknown = "GPU memory unknown (--gpu-memory GIB with --dry-run, or launch.performance.gpu_memory_gib)"
        if model_shape is None:
            why_ckpt = f"no memory estimate ({model_source}): kept on to be safe"
            mem["verdict"] = "no estimate: " + model_source
        else:   # issue 19: an estimate exists; what is missing is the GPU to hold it against
            est = memory.estimate(model_shape, replace(work, checkpointing=bool(ckpt), cpu_offload=bool(offload)))
            mem["estimate_gib"] = est.gib()
            why_ckpt = f"on to be safe: whether the job fits without it is unknown, {unknown}"
            mem["verdict"] = (f"{est.peak / memory.GiB:.2f} GiB peak per GPU with the choices above; not checked "
                              f"against the GPU: {unknown}")
        why_ckpt = why_ckpt if ckpt_source == "default" else "as set"
    else:
        choice = memory.choose(model_shape, work, gpu_memory_gib, grad_accum=accum, checkpointing=fixed_ckpt,
                               cpu_offload=fixed_offload, shrink_micro_batch=settings.micro_batch is not False,
                               margin=settings.safety_margin)
        mem["estimate_gib"] = choice.estimate.gib()
        mem["usable_gib"] = round(choice.usable / memory.GiB, 2)
        mem["gpu_memory_gib"] = gpu_memory_gib
        mem["verdict"] = choice.reason
        mem["tried"] = list(choice.tried)
        if not choice.fits:
            problems.append(f"memory: {choice.reason}; candidates: {'; '.join(choice.tried)}")
        ckpt, offload, new_micro = choice.checkpointing, choice.cpu_offload, choice.micro_batch
        why_ckpt = (("memory estimate fits without it" if not ckpt else "needed to fit the memory estimate")
                    if ckpt_source == "default" else "as set")
        if new_micro != micro:
            training["per_device_train_batch_size"] = new_micro
            training["gradient_accumulation_steps"] = choice.grad_accum
            notices.append(f"per_device_train_batch_size: {micro} -> {new_micro} with gradient_accumulation_steps "
                           f"{accum} -> {choice.grad_accum} (same global batch) to fit GPU memory")
    if ckpt_source == "config" and fsdp and _truthy(fc.get("activation_checkpointing")):
        why_ckpt = ("as set by fsdp_config.activation_checkpointing (FSDP's own; the top-level "
                    "activation_checkpointing stays false: transformers refuses both)")
    choices.append(_pick("activation_checkpointing", bool(ckpt), ckpt_source, why_ckpt))
    choices.append(_pick("cpu_offload", bool(offload), offload_source,
                         "needed to fit the memory estimate" if offload and offload_source == "default" else
                         ("not needed" if offload_source == "default" and fsdp else
                          "FSDP only" if not fsdp else "as set")))
    choices.append(_pick("micro_batch", new_micro, "default" if new_micro != micro else "config",
                         f"shrunk from {micro} to fit (gradient accumulation {accum} -> "
                         f"{training.get('gradient_accumulation_steps')})" if new_micro != micro else "as set"))

    if user_ckpt is None:
        if fsdp:
            training["activation_checkpointing"] = False
            if ckpt:
                fc["activation_checkpointing"] = True  # FSDP's own checkpointing (transformers prefers it)
        else:
            training["activation_checkpointing"] = bool(ckpt)
    if fsdp and user_offload is None and offload:
        fc["cpu_offload"] = True
    if fsdp and fc != _fsdp_config(training):
        training["fsdp_config"] = fc
    return {"choices": choices, "memory": mem}, notices, problems

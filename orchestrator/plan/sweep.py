"""Sweeps, planned (issue 19): the grid of ``--sweep`` values, each point's name and output_dir,
and how many of the group's jobs this machine runs at once. Pure: values in, values out.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path
from typing import Mapping, Sequence

from ..config.overrides import Override
from .launch_plan import LaunchPlan
from .topology import Topology

_SHORT = {"learning_rate": "lr", "per_device_train_batch_size": "bs", "gradient_accumulation_steps": "ga",
          "num_train_epochs": "ep", "weight_decay": "wd", "warmup_steps": "warmup", "max_length": "len",
          "lr_scheduler_type": "sched", "max_grad_norm": "clip", "nproc_per_node": "nproc"}


def grid(sweeps: Sequence[tuple[str, list[Override]]]) -> list[list[Override]]:
    """Every combination of the swept values, the first key varying slowest (the order people read)."""
    if not sweeps:
        return []
    return [list(point) for point in itertools.product(*(values for _, values in sweeps))]


def short_key(key: str) -> str:
    """The usual short name of a swept key (``learning_rate`` -> ``lr``), else its last dotted part."""
    last = key.rsplit(".", 1)[-1]
    return _SHORT.get(last, last)


def suffix(point: Sequence[Override]) -> str:
    """``lr-0.001_bs-8``: the readable name of a point (values as typed), safe in a path and a job id."""
    text = "_".join(f"{short_key(o.key)}-{o.text}" for o in point)
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-.") or "point"


def point_output_dir(output_base: str | None, point_suffix: str) -> Override | None:
    """``output_dir=<output_dir>/<suffix>`` for a point when the config sets ``output_dir`` (None otherwise:
    each job's output then lies in its own run directory already). An override like the others, so the
    job's frozen config and ``status`` show it."""
    if not output_base:
        return None
    out = str(Path(output_base) / point_suffix)
    return Override("output_dir", out, out)


def visible_devices(topo: Topology, environ: Mapping[str, str]) -> tuple[str, ...]:
    """The GPUs a local sweep shares out: ``CUDA_VISIBLE_DEVICES`` as given, else ``0 .. gpus-1``."""
    if not topo.gpus:
        return ()
    given = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return tuple(given[:topo.gpus]) if len(given) >= topo.gpus else tuple(str(i) for i in range(topo.gpus))


def parallel(plans: Sequence[LaunchPlan], topo: Topology, requested: int | None) -> tuple[int, int, str]:
    """``(jobs at once, GPUs or CPU ranks per job, why)`` for a local group.

    The default is what the machine can run at once: its GPUs (CPU cores on a CPU plan) divided by
    the most any point needs; ``--max-parallel N`` (``requested``) decides instead.
    """
    need = max(p.world_size for p in plans)
    gpu = plans[0].device == "cuda"
    units, what = (topo.gpus, "GPU(s)") if gpu else (topo.cpus, "CPU core(s)")
    fit = max(1, units // need)
    if requested is not None:
        extra = "" if requested <= fit else f"; more than the {fit} that fit without sharing {what}"
        return requested, need, f"--max-parallel {requested}{extra}"
    return min(fit, len(plans)), need, f"{units} {what} / {need} per job"


def share_cpu(plan: LaunchPlan, at_once: int, topo: Topology, user_env: Mapping[str, str]) -> LaunchPlan:
    """CPU plans running side by side share the cores (each plan alone would take them all)."""
    if plan.device != "cpu" or at_once <= 1 or "OMP_NUM_THREADS" in user_env:
        return plan
    threads = max(1, topo.cpus // (plan.world_size * at_once))
    return dataclasses.replace(plan, env={**plan.env, "OMP_NUM_THREADS": str(threads)})

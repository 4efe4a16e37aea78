"""A job's plan on another number of ranks, with the same global batch (issue 12).

A checkpoint taken with N ranks resumes with M: sharded checkpoints (DCP) are resharded on load,
and the optimizer steps after the resume must see the samples they would have seen on N ranks.
They do when every optimizer step still takes ``global batch = micro-batch x gradient accumulation
x world size`` samples in the same order: the micro-batch is kept where it can be (then the very
same micro-batches are formed, only spread differently over ranks and accumulation steps), else
the largest that divides the samples per rank. Pure: the caller writes the new plan.
"""
from __future__ import annotations

import dataclasses

from ..config import ConfigError
from .launch_plan import LaunchPlan

HF_MICRO_DEFAULT = 8   # transformers' per_device_train_batch_size default


def batch_of(plan: LaunchPlan) -> tuple[int, int, int]:
    """``(micro-batch, gradient accumulation, global batch)`` of ``plan``."""
    wc = plan.worker_config
    micro = int(wc.get("per_device_train_batch_size") or HF_MICRO_DEFAULT)
    accum = int(wc.get("gradient_accumulation_steps") or 1)
    return micro, accum, micro * accum * plan.world_size


def world_sizes_keeping(global_batch: int, limit: int = 64) -> list[int]:
    """The world sizes (up to ``limit``) that can keep ``global_batch`` samples per optimizer step."""
    return [w for w in range(1, min(limit, global_batch) + 1) if global_batch % w == 0]


def resize_plan(plan: LaunchPlan, nnodes: int, nproc_per_node: int) -> tuple[LaunchPlan, list[str]]:
    """``plan`` on ``nnodes`` x ``nproc_per_node`` ranks with its global batch; the new plan and what changed.

    Raises :class:`ConfigError` (naming the flags) when no layout keeps the global batch.
    """
    flags = f"--nproc-per-node {nproc_per_node}" + (f" --nodes {nnodes}" if nnodes != plan.nnodes else "")
    problems = []
    if nnodes < 1 or nproc_per_node < 1:
        problems.append(f"{flags}: expected at least one node and one process per node")
    if plan.backend == "local" and nnodes != 1:
        problems.append(f"--nodes {nnodes}: a local job runs on one node; use launch.backend: slurm for more")
    micro, accum, global_batch = batch_of(plan)
    world = nnodes * nproc_per_node
    if not problems and global_batch % world:
        problems.append(f"{flags}: world size {world} cannot keep the global batch of {global_batch} samples "
                        f"({micro} per device x {accum} accumulation x {plan.world_size} ranks); world sizes "
                        f"that can: {', '.join(map(str, world_sizes_keeping(global_batch)))}")
    if problems:
        raise ConfigError(f"{plan.job_id} (orchestrate resume)", problems)
    per_rank = global_batch // world
    new_micro = micro if per_rank % micro == 0 else max(d for d in range(1, min(micro, per_rank) + 1)
                                                       if per_rank % d == 0)
    new_accum = per_rank // new_micro
    wc = {**plan.worker_config, "per_device_train_batch_size": new_micro, "gradient_accumulation_steps": new_accum}
    env = dict(plan.env)
    if plan.device == "cpu" and env.get("OMP_NUM_THREADS", "").isdigit():   # the same cores, shared anew
        env["OMP_NUM_THREADS"] = str(max(1, int(env["OMP_NUM_THREADS"]) * plan.nproc_per_node // nproc_per_node))
    slurm = dict(plan.slurm)
    if slurm and "nodes" in slurm:
        slurm["nodes"] = nnodes
    said = [f"resized from {plan.nnodes}x{plan.nproc_per_node} to {nnodes}x{nproc_per_node} ranks: global batch "
            f"{global_batch} kept (micro-batch {micro} -> {new_micro}, gradient accumulation {accum} -> {new_accum})"]
    if new_micro != micro:
        said.append(f"per_device_train_batch_size {micro} -> {new_micro}: the optimizer steps see the same samples, "
                    f"grouped into other micro-batches (sums in another order)")
    new = dataclasses.replace(plan, nnodes=nnodes, nproc_per_node=nproc_per_node, worker_config=wc, env=env,
                              slurm=slurm, notices=tuple(plan.notices) + tuple(said))
    return new, said

"""From a config file to a plan: read the inputs once, then plan (what ``validate`` and ``--dry-run`` do).

The only function of the package that both reads the outside world (through
:mod:`orchestrator.plan.inputs`) and plans; it creates and starts nothing.
"""
from __future__ import annotations

import dataclasses
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Sequence

from ..config import ConfigError, JobConfig, load_config
from ..config.overrides import Override
from ..store.paths import orchestrate_home
from .inputs import default_worker_script, detect_topology, inspect_inputs, read_model_config, read_model_shape
from .launch_plan import LaunchPlan
from .make import make_plan
from .topology import Topology


def new_job_id(name: str) -> str:
    """``<name>-<MMDD>-<6 hex>``: readable, sortable by day, unique enough to type a short prefix."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:40] or "job"
    return f"{safe}-{time.strftime('%m%d')}-{secrets.token_hex(3)}"


def prepare(config_path: str, *, home: Path | None = None, topology: Topology | None = None,
            cwd: str | None = None, job_id: str | None = None,
            backend: str | None = None, script: str | None = None,
            overrides: Sequence[Override] = ()) -> tuple[JobConfig, LaunchPlan]:
    """Validate and plan without side effects (what ``--dry-run`` shows).

    ``backend`` replaces the config's ``launch.backend`` (``submit --backend``), ``script`` its
    ``launch.script`` (``submit --script``); ``overrides`` (``KEY=VALUE``) are set in the config
    before it is validated, and recorded in the plan.
    """
    cwd = cwd or os.getcwd()
    cfg = load_config(config_path, cwd=cwd, script=script, overrides=overrides, inspect=inspect_inputs)
    if backend:
        cfg = dataclasses.replace(cfg, launch=dataclasses.replace(cfg.launch, backend=backend))
    topo = topology or detect_topology()
    plan = make_plan(cfg, topo, job_id=job_id or new_job_id(cfg.name), home=home or orchestrate_home(),
                     python=sys.executable, worker_script=default_worker_script(), workdir=cwd,
                     model=read_model_shape(cfg.training.get("model_id")))
    if overrides:
        plan = dataclasses.replace(plan, overrides=tuple(str(o) for o in overrides))
    return cfg, _as_the_worker_sees_it(cfg, plan)


def _as_the_worker_sees_it(cfg: JobConfig, plan: LaunchPlan) -> LaunchPlan:
    """The worker's own view of the planned config: its ``SFTConfig`` must build with the plan's choices in it
    (ConfigError if not), and the attention the plan chose may need a notice for this architecture."""
    if cfg.launch.script:
        return plan
    from ..config.training_args import training_args_problems
    from ..worker.architecture import attention_notice
    from .performance import VARLEN

    problems = training_args_problems(plan.worker_config)
    if problems:
        raise ConfigError(str(cfg.source), [f"{p}; with the plan's choices applied" for p in problems],
                          list(plan.notices))
    notice = attention_notice(plan.worker_config, read_model_config(cfg.training.get("model_id")), VARLEN)
    return dataclasses.replace(plan, notices=plan.notices + (notice,)) if notice else plan

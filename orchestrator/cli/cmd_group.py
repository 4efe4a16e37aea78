"""Sweeps (issue 19): ``submit|validate CONFIG --sweep KEY=V1,V2 ...`` and the ``--group`` verbs.

A sweep plans every point of the grid first (all problems of all points at once, exit 2, nothing
written), then creates one job per point under a group id. Locally each job gets a background
supervisor that waits QUEUED for its slot (:mod:`orchestrator.supervise.queue`); on SLURM each job
is its own allocation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from ..errors import JobError
from .common import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, EXIT_USAGE, print_notices

GROUP_HINT = "Ctrl-C leaves this view; the jobs keep running."
SWEEP_HINT = "Ctrl-C CANCELS every job of this sweep.   To keep them running without this terminal: --detach"


def _plan_points(args, overrides):
    """``(topology, [(cfg, plan, point, suffix)])`` of every grid point, or a ConfigError with every problem."""
    from ..config import ConfigError
    from ..config.overrides import parse_sweeps
    from ..plan.inputs import detect_topology
    from ..plan.prepare import new_job_id, prepare
    from ..plan.sweep import grid, point_output_dir, suffix
    from .cmd_jobs import as_if

    sweeps, problems = parse_sweeps(args.sweep)
    both = sorted({o.key for o in overrides} & {key for key, _ in sweeps})
    problems += [f"{key}: given as KEY=VALUE and as --sweep; keep one" for key in both]
    if getattr(args, "max_parallel", None) is not None and args.max_parallel < 1:
        problems.append(f"--max-parallel: expected 1 or more, got {args.max_parallel}")
    if problems:
        raise ConfigError(args.config, problems)
    topo = (as_if(args) if hasattr(args, "gpus") else None) or detect_topology()
    common = dict(backend=getattr(args, "backend", None), script=args.script, topology=topo)
    cfg0, _ = prepare(args.config, overrides=overrides, **common)   # what every point shares, checked once
    base, points, problems = cfg0.training.get("output_dir"), [], []
    for point in grid(sweeps):
        sfx = suffix(point)
        extra = [o for o in (point_output_dir(base, sfx),) if o is not None]
        shared = [o for o in overrides if not (extra and o.key == "output_dir")]   # the point's replaces it
        try:
            cfg, plan = prepare(args.config, overrides=[*shared, *point, *extra],
                                job_id=new_job_id(f"{cfg0.name}-{sfx}"), **common)
        except ConfigError as exc:
            problems += [f"point {sfx}: {p}" for p in exc.problems]
            continue
        points.append((cfg, dataclasses.replace(plan, name=f"{cfg0.name}-{sfx}"), point, sfx))
    if problems:
        raise ConfigError(args.config, problems, list(cfg0.notices))
    return topo, cfg0, points


def sweep(args, overrides, validate_only: bool = False) -> int:
    """``submit/validate CONFIG --sweep ...``: plan every point; validate, print (--dry-run) or submit them."""
    from ..plan.prepare import new_job_id
    from ..plan.sweep import parallel, share_cpu, visible_devices
    from ..store.groups import Group, Point
    from .cmd_jobs import check_output_dir

    topo, cfg0, points = _plan_points(args, overrides)
    for cfg, plan, _, _ in points:
        check_output_dir(cfg, plan)
    if validate_only:
        print_notices(_shared_notices([p for _, p, _, _ in points]))
        for _, plan, _, sfx in points:
            print(f"{args.config} {' '.join(plan.overrides)}: OK ({plan.device}, {plan.world_size} process(es))")
        return EXIT_OK
    plans = [p for _, p, _, _ in points]
    local = plans[0].backend == "local"
    at_once, per_job, why = parallel(plans, topo, args.max_parallel) if local else (len(plans), 0, "SLURM")
    devices = visible_devices(topo, os.environ) if local and plans[0].device == "cuda" else ()
    if local:   # side by side on this machine: CPU plans share its cores
        plans = [share_cpu(p, at_once, topo, cfg0.launch.env) for p in plans]
    group = Group(id=new_job_id(f"{cfg0.name}-sweep"), name=cfg0.name, created=time.time(),
                  config_path=str(cfg0.source), backend=plans[0].backend, keys=tuple(dict.fromkeys(
                      o.key for o in points[0][2])), overrides=tuple(str(o) for o in overrides),
                  max_parallel=at_once, parallel_why=why, ranks_per_job=per_job, devices=devices,
                  points=tuple(Point(p.job_id, {o.key: o.value for o in pt}, sfx)
                               for p, (_, _, pt, sfx) in zip(plans, points)))
    if args.dry_run:
        print(describe_group(group, plans), end="")
        return EXIT_OK
    return _submit(args, group, [(c, p) for (c, _, _, _), p in zip(points, plans)])


def _shared_notices(plans) -> list[str]:
    """Each notice once, and none about GPUs a sweep's side-by-side jobs use anyway."""
    seen = dict.fromkeys(n for p in plans for n in p.notices)
    return [n for n in seen if "would sit idle" not in n]


def describe_group(group, plans) -> str:
    """``submit --dry-run --sweep``: the group, its points and the first point's full plan."""
    from ..dashboard.plan_view import describe_plan

    lines = [f"group           {group.id}  ({len(plans)} job(s) over {' x '.join(group.keys)}, backend "
             f"{group.backend})"]
    if group.backend == "local":
        lines.append(f"queue           {group.max_parallel} at once ({group.parallel_why}); the others wait "
                     "QUEUED and start as earlier ones end")
        lines += [f"  slot {k + 1}: GPUs {group.devices_for(k)}" for k in range(group.max_parallel) if group.devices]
    else:
        lines.append("queue           each job is its own SLURM allocation (the scheduler's queue)")
    lines.append("points")
    for plan, point in zip(plans, group.points):
        keys = " ".join(f"{k}={v}" for k, v in point.keys.items())
        lines.append(f"  {point.job_id:<40} {keys}   output_dir {plan.output_dir}")
    lines += [f"plan of {group.points[0].job_id} (the other points differ only in their keys)", ""]
    return "\n".join(lines) + describe_plan(plans[0])


def _submit(args, group, items) -> int:
    from ..config import ConfigError
    from ..store.jobs import open_ledger
    from ..store.paths import orchestrate_home
    from ..supervise.sweep import create_group, start_local, submit_slurm

    print_notices(_shared_notices([p for _, p in items]))
    if group.backend == "slurm":
        from ..backends.slurm.submit import preflight

        problems = [f"{plan.job_id}: {p}" for _, plan in items for p in preflight(plan)]
        if problems:
            raise ConfigError(group.config_path, problems)
    home, ledger = orchestrate_home(), open_ledger()
    jobs = create_group(home, ledger, group, items)
    if group.backend == "local":
        start_local(home, jobs)
    else:
        submit_slurm(ledger, jobs)
    where = f"{group.max_parallel} at once on this machine" if group.backend == "local" else "one SLURM job each"
    print(f"group {group.id}: {len(jobs)} job(s), {where}; orchestrate status --group {group.id}", file=sys.stderr)
    if args.detach:
        for job in jobs:
            print(job.id)
        return EXIT_OK
    return follow_group(ledger, group)


def follow_group(ledger, group) -> int:
    """Watch the group until every job has ended; Ctrl-C cancels them all. The exit status: 0 if all
    completed, 1 if one failed, 130 if one was cancelled (and none failed)."""
    from ..supervise.sweep import cancel_group as cancel_all

    last: dict[str, str] = {}
    try:
        while True:
            jobs = [ledger.get(i) for i in group.job_ids]
            for job in jobs:
                said = f"{job.state.value}: {(job.message or '').splitlines()[0] if job.message else ''}"
                if last.get(job.id) != said:
                    print(f"{time.strftime('%H:%M:%S')} {job.id} {said}", flush=True)
                    last[job.id] = said
            if all(j.state.is_terminal for j in jobs):
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        print(f"\nCtrl-C: cancelling every job of group {group.id} ...", file=sys.stderr, flush=True)
        cancel_all(ledger, group)
        return EXIT_CANCELLED
    states = {j.state.value for j in jobs}
    return EXIT_FAILED if "FAILED" in states else EXIT_CANCELLED if "CANCELLED" in states else EXIT_OK


def status_group(args) -> int:
    """``orchestrate status --group G [--json]``: the group table, best eval loss first."""
    from ..dashboard.groups import group_frame, group_json
    from ..dashboard.live import SnapshotSource, make_console
    from ..store.groups import resolve_group
    from ..store.jobs import open_ledger
    from ..store.paths import orchestrate_home

    ledger = open_ledger()
    group = resolve_group(orchestrate_home(), args.group)
    source = SnapshotSource.for_ledger(ledger)

    def snaps():
        return {j.id: source.snapshot(j, detail=True) for j in (ledger.get(i) for i in group.job_ids) if j}

    if args.json:
        print(json.dumps(group_json(group, snaps()), indent=1, sort_keys=True, default=str))
        return EXIT_OK
    if args.once or not sys.stdout.isatty():
        make_console().print(group_frame(group, snaps(), time.time()))
        return EXIT_OK
    return _watch(lambda: group_frame(group, snaps(), time.time(), GROUP_HINT), max(0.2, args.interval))


def _watch(frame, interval: float) -> int:
    from rich.live import Live

    from ..dashboard.live import make_console

    try:
        with Live(frame(), console=make_console(), auto_refresh=False, vertical_overflow="crop") as live:
            while True:
                time.sleep(interval)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def list_group(args, states) -> int:
    """``orchestrate list --group G``: the group's jobs, one line each."""
    from ..dashboard.live import print_list
    from ..store.groups import resolve_group
    from ..store.jobs import open_ledger
    from ..store.paths import orchestrate_home

    group = resolve_group(orchestrate_home(), args.group)
    jobs = open_ledger().jobs(states or None, group=group.id)
    if args.json:
        print(json.dumps([j.to_json() for j in jobs], indent=1, sort_keys=True))
    else:
        print_list(jobs)
    return EXIT_OK


def cancel_group(args) -> int:
    """``orchestrate cancel --group G``: every job of the group that has not ended, queued ones first."""
    from ..store.groups import resolve_group
    from ..store.jobs import open_ledger
    from ..store.paths import orchestrate_home
    from ..supervise.sweep import cancel_group as cancel_all

    if not args.group:
        print("error: cancel needs JOB or --group G", file=sys.stderr)
        return EXIT_USAGE
    if args.job:
        raise JobError("cancel: give JOB or --group G, not both")
    ledger = open_ledger()
    group = resolve_group(orchestrate_home(), args.group)
    left = cancel_all(ledger, group)
    for job_id, pids in left.items():
        state = ledger.get(job_id).state.value
        print(f"{job_id}: {state}" + (f"; processes still alive: {pids}" if pids else "; no process of it is left"))
    if not left:
        print(f"group {group.id}: every job had ended already; nothing to cancel")
    return EXIT_FAILED if any(left.values()) else EXIT_OK

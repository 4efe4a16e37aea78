"""Pure launch planning: nproc/device table, FSDP environment, the frozen plan, goldens, hostile paths.

Goldens: ``tests/golden/<config>.plan.txt`` hold ``describe_plan`` of every config in
``configs/``; regenerate them with ``UPDATE_GOLDEN=1 pytest tests/test_plan.py``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from helpers import BASE_YAML, GOLDEN_DIR, job_config, make_demo_workdir, model_of, shipped_configs, write_config

from orchestrator.config import ConfigError, load_config
from orchestrator.dashboard.plan_view import describe_plan
from orchestrator.plan import LaunchPlan, choose_nproc, fsdp_env, make_plan
from orchestrator.plan.prepare import prepare
from orchestrator.plan.topology import Topology
from orchestrator.worker import channel

HOME = Path("/home/u/.orchestrate")
JOB = "job-0101-abcdef"


def plan_for(cfg, topo: Topology, **kw) -> LaunchPlan:
    args = dict(job_id=JOB, home=HOME, python="/usr/bin/python3", worker_script="/opt/train_worker.py",
                workdir="/work")
    return make_plan(cfg, topo, **{**args, "model": model_of(cfg), **kw})


# --- nproc and device: one table ---------------------------------------------------------------

# (topology, launch.nproc_per_node, use_cpu) -> (nproc, device, OMP_NUM_THREADS or None)
NPROC_CASES = {
    "0 GPUs auto -> 1 CPU proc": (Topology(0, 8), "auto", False, 1, "cpu", "8"),
    "0 GPUs nproc 2 -> 2 CPU procs": (Topology(0, 8), 2, False, 2, "cpu", "4"),
    "0 GPUs, more procs than cores": (Topology(0, 2), 4, False, 4, "cpu", "1"),
    "8 GPUs auto -> 8 cuda": (Topology(8, 64), "auto", False, 8, "cuda", None),
    "4 GPUs nproc 2 -> 2 cuda": (Topology(4, 64), 2, False, 2, "cuda", None),
    "use_cpu with GPUs -> CPU plan": (Topology(8, 64), "auto", True, 1, "cpu", "64"),
    "use_cpu with GPUs, nproc 4": (Topology(8, 64), 4, True, 4, "cpu", "16"),
}


@pytest.mark.parametrize("topo, nproc, use_cpu, want_nproc, want_device, want_omp",
                         NPROC_CASES.values(), ids=NPROC_CASES.keys())
def test_nproc_and_device(topo, nproc, use_cpu, want_nproc, want_device, want_omp):
    got_nproc, device, _, problems = choose_nproc(nproc, topo, use_cpu)
    assert (got_nproc, device, problems) == (want_nproc, want_device, [])

    plan = plan_for(job_config({"use_cpu": use_cpu}, nproc_per_node=nproc), topo)
    assert (plan.nproc_per_node, plan.device, plan.nnodes) == (want_nproc, want_device, 1)
    assert plan.env.get("OMP_NUM_THREADS") == want_omp
    assert plan.worker_config["use_cpu"] is (want_device == "cpu")
    assert f"--nproc-per-node={want_nproc}" in plan.argv(1)


def test_auto_on_cpu_says_why_in_a_notice():
    plan = plan_for(job_config(), Topology(0, 8))
    assert any(n.startswith("no GPU visible: CPU plan with 1 process") for n in plan.notices)


def test_more_processes_than_gpus_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        plan_for(job_config(nproc_per_node=8), Topology(4, 64))
    (problem,) = info.value.problems
    assert problem.startswith("launch.nproc_per_node: 8 processes but only 4 GPU(s) are visible")


@pytest.mark.parametrize("training, nproc, want", [
    ({}, 1, "single"), ({}, 2, "ddp"), ({"fsdp": True}, 1, "fsdp"), ({"fsdp": True}, 2, "fsdp"),
])
def test_distributed_mode(training, nproc, want):
    assert plan_for(job_config(training, nproc_per_node=nproc), Topology(0, 8)).distributed == want


def test_user_omp_num_threads_is_not_overridden():
    plan = plan_for(job_config(nproc_per_node=2, env={"OMP_NUM_THREADS": "3"}), Topology(0, 8))
    assert plan.env["OMP_NUM_THREADS"] == "3"


# --- FSDP environment --------------------------------------------------------------------------------

FSDP_ENV = {
    "fsdp on": ({"fsdp": True}, {"ACCELERATE_USE_FSDP": "1", "FSDP_CPU_RAM_EFFICIENT_LOADING": "1"}),
    "fsdp off": ({"fsdp": False}, {}),
    "fsdp unset": ({}, {}),
    "ram-efficient loading off": ({"fsdp": True, "fsdp_config": {"cpu_ram_efficient_loading": False}},
                                  {"ACCELERATE_USE_FSDP": "1"}),
    "ram-efficient loading 'false'": ({"fsdp": True, "fsdp_config": {"cpu_ram_efficient_loading": "false"}},
                                      {"ACCELERATE_USE_FSDP": "1"}),
    "fsdp_config from a file": ({"fsdp": True, "fsdp_config": "fsdp.json"},
                                {"ACCELERATE_USE_FSDP": "1", "FSDP_CPU_RAM_EFFICIENT_LOADING": "1"}),
}


@pytest.mark.parametrize("training, want", FSDP_ENV.values(), ids=FSDP_ENV.keys())
def test_fsdp_env(training, want):
    assert fsdp_env(training) == want
    env = plan_for(job_config(training), Topology(8, 64)).env
    assert {k: env[k] for k in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING") if k in env} == want


def test_fsdp1_on_cpu_is_a_config_error():
    cfg = job_config({"fsdp": True, "fsdp_config": {"version": 1}})
    with pytest.raises(ConfigError) as info:
        plan_for(cfg, Topology(0, 8))
    assert info.value.problems == ["fsdp_config.version: FSDP1 does not run on CPU; use version 2 (the default)"]
    assert plan_for(cfg, Topology(8, 64)).device == "cuda"  # fine on GPUs


# --- paths, environment, the plan object ----------------------------------------------------------

def test_default_output_dir_is_inside_the_run_dir():
    plan = plan_for(job_config(), Topology(0, 8))
    assert plan.run_dir == str(HOME / "runs" / JOB)
    assert plan.output_dir == str(HOME / "runs" / JOB / "output")
    assert plan.worker_config["output_dir"] == plan.output_dir


def test_explicit_output_dir_is_kept():
    plan = plan_for(job_config({"output_dir": "/big/disk/out"}), Topology(0, 8))
    assert plan.output_dir == plan.worker_config["output_dir"] == "/big/disk/out"


def test_planning_does_not_change_the_config():
    cfg = job_config()
    plan_for(cfg, Topology(0, 8))
    assert "output_dir" not in cfg.training and "use_cpu" not in cfg.training


def test_launch_env_is_passed_through():
    plan = plan_for(job_config(env={"NCCL_DEBUG": "WARN", "HF_HOME": "/cache"}), Topology(8, 64),
                    user_env={"HF_HOME": "/user", "WANDB_MODE": "offline"})
    assert plan.env["NCCL_DEBUG"] == "WARN"
    assert plan.env["HF_HOME"] == "/cache"  # launch.env wins over the caller's
    assert plan.env["WANDB_MODE"] == "offline"
    assert plan.env[channel.ENV_JOB_ID] == JOB
    assert plan.env[channel.ENV_RUN_DIR] == plan.run_dir
    env = plan.attempt_env(2, "/out/checkpoint-10")
    assert env["NCCL_DEBUG"] == "WARN"
    assert env[channel.ENV_ATTEMPT] == "2"
    assert env[channel.ENV_ATTEMPT_DIR] == str(HOME / "runs" / JOB / "attempts" / "2")
    assert env[channel.ENV_RESUME_FROM] == "/out/checkpoint-10"
    assert plan.attempt_env(1, None)[channel.ENV_RESUME_FROM] == "none"


def test_argv_runs_the_agent_on_the_worker_with_its_config():
    argv = plan_for(job_config(nproc_per_node=2), Topology(0, 8)).argv(3)
    assert argv[:3] == ["/usr/bin/python3", "-m", "orchestrator.worker.agent"]
    assert argv[-3:] == ["/opt/train_worker.py", "--config", str(HOME / "runs" / JOB / "worker_config.yaml")]
    assert "--max-restarts=0" in argv and "--standalone" in argv
    assert f"--log-dir={HOME / 'runs' / JOB / 'attempts' / '3' / 'ranks'}" in argv


def test_plan_is_frozen():
    plan = plan_for(job_config(), Topology(0, 8))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.nproc_per_node = 4  # type: ignore[misc]


def test_plan_round_trips_through_dict_and_json():
    plan = plan_for(job_config({"fsdp": True}, env={"A": "1"}), Topology(0, 8))
    assert LaunchPlan.from_dict(plan.to_dict()) == plan
    assert LaunchPlan.from_dict(json.loads(plan.to_json())) == plan


# --- goldens: describe_plan of every shipped config ------------------------------------------------

GOLDEN_TOPO = Topology(gpus=0, cpus=16, hostname="golden")
GOLDEN_CASES = [(p, GOLDEN_TOPO, f"{p.stem}.plan.txt") for p in shipped_configs()]
GOLDEN_CASES += [(p, Topology(gpus=8, cpus=96, hostname="golden"), f"{p.stem}.8gpu.plan.txt")
                 for p in shipped_configs() if p.stem == "multi-gpu-fsdp2"]


@pytest.mark.parametrize("config, topo, golden", GOLDEN_CASES, ids=[c[2] for c in GOLDEN_CASES])
def test_describe_plan_golden(config, topo, golden, tmp_path):
    workdir = make_demo_workdir(tmp_path / "work")
    cfg = load_config(config, cwd=workdir)
    plan = make_plan(cfg, topo, job_id="golden-0101-000000", home=tmp_path / "home",
                     python="/opt/python/bin/python3", worker_script="/opt/orchestrate/train_worker.py",
                     workdir=str(workdir), model=model_of(cfg))
    text = describe_plan(plan).replace(str(tmp_path), "<TMP>")
    path = GOLDEN_DIR / golden
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"no golden {path}; run UPDATE_GOLDEN=1 pytest {__file__}"
    assert text == path.read_text()


def test_every_golden_has_its_config():
    expected = {c[2] for c in GOLDEN_CASES}
    assert {p.name for p in GOLDEN_DIR.glob("*.plan.txt")} == expected


# --- hostile paths ----------------------------------------------------------------------------------

HOSTILE = "we ird 'q' \"dq\" $(touch x) `touch y`\nnext line"


def _block(text: str, start: str, end: str) -> str:
    """The indented lines between the header line starting with ``start`` and the line equal to ``end``."""
    lines = text.split("\n")
    i = next(n for n, line in enumerate(lines) if line.startswith(start))
    j = lines.index(end, i)
    return "\n".join(lines[i + 1:j])


def test_hostile_paths_survive_argv_and_are_shell_quoted(tmp_path):
    workdir = make_demo_workdir(tmp_path / f"work {HOSTILE}")
    home = tmp_path / f"home {HOSTILE}"
    worker = str(workdir / "train worker.py")
    (workdir / "job.yaml").write_text("model_id: .demo/model\ndataset_path: .demo/data\nmax_steps: 2\n")
    cfg = load_config(workdir / "job.yaml", cwd=workdir)
    plan = make_plan(cfg, Topology(0, 4), job_id=JOB, home=home, python="/usr/bin/python3",
                     worker_script=worker, workdir=str(workdir), model=model_of(cfg))
    run_dir = home / "runs" / JOB

    argv = plan.argv(1)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert argv[-3:] == [worker, "--config", str(run_dir / "worker_config.yaml")]
    assert f"--log-dir={run_dir / 'attempts' / '1' / 'ranks'}" in argv
    assert plan.worker_config["model_id"] == str(workdir / ".demo" / "model")

    text = describe_plan(plan)
    command = _block(text, "command ", "environment")
    assert command.startswith("  ")
    assert shlex.split(command) == argv
    env_lines = _block(text, "environment", "paths")
    assert dict(kv.split("=", 1) for kv in shlex.split(env_lines)) == plan.attempt_env(1, None)

    # A real shell reads the command back as the same argv and runs nothing hidden in the paths.
    out = subprocess.run(["bash", "-c", "printf '%s\\0' " + command], cwd=tmp_path, capture_output=True,
                         check=True).stdout
    assert out.decode().split("\0")[:-1] == argv
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --- resize (issue 12) -------------------------------------------------------------------------------

def _resizable(tmp_path, micro=8, accum=1, nproc=2):
    workdir = make_demo_workdir(tmp_path / "work")
    path = write_config(workdir / "job.yaml", BASE_YAML + f"per_device_train_batch_size: {micro}\n"
                        f"gradient_accumulation_steps: {accum}\nlaunch:\n  nproc_per_node: {nproc}\n")
    _, plan = prepare(str(path), home=tmp_path / "home", topology=Topology(gpus=0, cpus=8, hostname="t"),
                      cwd=str(workdir), job_id="rs")
    return plan


def test_resize_keeps_the_global_batch_with_more_accumulation_or_a_smaller_micro_batch(tmp_path):
    from orchestrator.plan.resize import batch_of, resize_plan

    plan = _resizable(tmp_path)                                   # 8 x 1 x 2 ranks = 16
    one, said = resize_plan(plan, 1, 1)
    assert batch_of(one) == (8, 2, 16) and one.world_size == 1 and "global batch 16 kept" in said[0]
    assert one.env["OMP_NUM_THREADS"] == str(int(plan.env["OMP_NUM_THREADS"]) * 2)
    four, said = resize_plan(plan, 1, 4)
    assert batch_of(four) == (4, 1, 16) and "per_device_train_batch_size 8 -> 4" in said[1]
    assert batch_of(resize_plan(four, 1, 2)[0]) == (4, 2, 16)   # back on 2 ranks: other micro-batches, same samples


def test_resize_refuses_a_world_size_that_cannot_keep_the_global_batch_and_lists_those_that_can(tmp_path):
    from orchestrator.config import ConfigError
    from orchestrator.plan.resize import resize_plan

    plan = _resizable(tmp_path)
    with pytest.raises(ConfigError) as e:
        resize_plan(plan, 1, 3)
    assert e.value.problems == ["--nproc-per-node 3: world size 3 cannot keep the global batch of 16 samples "
                                "(8 per device x 1 accumulation x 2 ranks); world sizes that can: 1, 2, 4, 8, 16"]
    with pytest.raises(ConfigError) as e:
        resize_plan(plan, 2, 1)
    assert "a local job runs on one node" in e.value.problems[0]

"""Issue 19, fast: KEY=VALUE overrides, sweep grids and their names, the local queue's slots (FIFO,
GPUs per slot, cancel while queued), the group verbs' argument handling. The real thing (jobs
queueing for the CPU ranks, notifications going out) is ``test_sweep_integration.py``."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import yaml
from helpers import BASE_YAML, job_config, make_demo_workdir, model_of, write_config

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config
from orchestrator.config.overrides import Override, apply_overrides, parse_overrides, parse_sweeps, read_value
from orchestrator.plan import make_plan
from orchestrator.plan.prepare import prepare
from orchestrator.plan.sweep import grid, parallel, point_output_dir, share_cpu, suffix, visible_devices
from orchestrator.plan.topology import Topology
from orchestrator.states import JobState
from orchestrator.store import groups, requests
from orchestrator.store.lease import Lease
from orchestrator.store.ledger import Ledger
from orchestrator.supervise.jobs import config_changes, create_job
from orchestrator.supervise.queue import try_claim, wait_turn
from orchestrator.supervise.supervisor import Supervisor


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(make_demo_workdir(tmp_path / "work"))
    monkeypatch.setenv("ORCHESTRATE_HOME", str(tmp_path / "home"))
    return tmp_path / "work"


# --- overrides ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("1e-5", 1e-05), ("2E-4", 2e-04), ("3", 3), ("0.5", 0.5), ("-1", -1), ("true", True), ("null", None),
    ("", None), ("none", "none"), ("[a, b]", ["a", "b"]), ("cosine", "cosine"), ("'1e-5'", "1e-5"),
])
def test_values_are_read_as_yaml_and_exponents_are_numbers(text, want):
    assert read_value(text) == want and type(read_value(text)) is type(want)


def test_dotted_keys_reach_sections_and_create_them():
    ovs, problems = parse_overrides(["launch.nproc_per_node=1", "fsdp_config.cpu_offload=true", "lr_x=2",
                                     "launch.retry.backoff_s=0.5"])
    assert not problems
    out, problems = apply_overrides({"fsdp_config": {"version": 2}, "launch": {"name": "n"}}, ovs)
    assert not problems
    assert out == {"fsdp_config": {"version": 2, "cpu_offload": True}, "lr_x": 2,
                   "launch": {"name": "n", "nproc_per_node": 1, "retry": {"backoff_s": 0.5}}}


def test_bad_overrides_are_all_reported():
    _, problems = parse_overrides(["nokey", "=3", "a=1", "a=2"])
    assert len(problems) == 3 and any("given twice" in p for p in problems)
    _, problems = apply_overrides({"model_id": "m"}, parse_overrides(["model_id.x=1"])[0])
    assert problems == ["model_id.x=1 (command line): model_id is str 'm' in the config, not a section"]
    _, problems = apply_overrides({}, parse_overrides(["fsdp_config.cpu_ofload=true", "fsdp_config.own_key=1"])[0])
    assert problems == ["fsdp_config.cpu_ofload: unknown key (did you mean 'fsdp_config.cpu_offload'?)"]


def test_overrides_are_applied_before_validation(workdir):
    cfg_path = write_config(workdir / "c.yaml", BASE_YAML)
    cfg = load_config(cfg_path, overrides=parse_overrides(["learning_rate=1e-5", "launch.nproc_per_node=1"])[0])
    assert cfg.training["learning_rate"] == 1e-05 and cfg.launch.nproc_per_node == 1
    assert not any("learning_rate" in n for n in cfg.notices)    # a number typed as 1e-5 is no YAML 1.1 string
    with pytest.raises(ConfigError) as err:
        load_config(cfg_path, overrides=parse_overrides(["learning_rat=1e-5", "launch.retry.max_restart=1"])[0])
    assert "learning_rat: unknown key (did you mean 'learning_rate'?)" in err.value.problems
    assert any("launch.retry.max_restart" in p and "max_restarts" in p for p in err.value.problems)


def test_the_job_records_its_overrides_and_its_frozen_config_holds_them(workdir, tmp_path):
    cfg_path = write_config(workdir / "c.yaml", BASE_YAML + "# a comment\n")
    ovs = parse_overrides(["learning_rate=1e-5", "max_steps=7"])[0]
    cfg, plan = prepare(str(cfg_path), topology=Topology(0, 2), overrides=ovs)
    assert plan.overrides == ("learning_rate=1e-5", "max_steps=7") and plan.worker_config["max_steps"] == 7
    ledger = Ledger.for_home(tmp_path / "home")
    job = create_job(cfg, plan, ledger)
    frozen = yaml.safe_load((plan.paths.run_dir / "config.yaml").read_text())
    assert frozen["learning_rate"] == 1e-5 and frozen["max_steps"] == 7
    assert config_changes(job) == []          # the overrides are no edits of the file
    cfg_path.write_text(BASE_YAML.replace("max_steps: 10", "max_steps: 12"))
    assert config_changes(job) == []          # max_steps is overridden anyway: what the job ran is unchanged
    cfg_path.write_text(BASE_YAML + "seed: 3\n")
    assert config_changes(job) == ["seed: None -> 3"]


def test_cli_takes_overrides_after_options_and_names_a_misspelt_key(workdir, capsys):
    cfg_path = write_config(workdir / "c.yaml", BASE_YAML)
    assert main(["validate", str(cfg_path), "learning_rate=1e-5", "launch.nproc_per_node=1"]) == 0
    assert "with learning_rate=1e-5 launch.nproc_per_node=1" in capsys.readouterr().out
    assert main(["submit", "--dry-run", str(cfg_path), "--backend", "local", "max_steps=3", "seed=5"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "seed: 5" in out and "\noverrides       max_steps=3 seed=5   (KEY" in out
    assert main(["validate", str(cfg_path), "learnin_rate=1e-5"]) == 2
    assert "learnin_rate: unknown key (did you mean 'learning_rate'?)" in capsys.readouterr().err
    assert not (workdir.parent / "home" / "runs").exists()     # nothing written


# --- sweeps planned --------------------------------------------------------------------------------------

def test_the_grid_is_every_combination_with_readable_names():
    sweeps, problems = parse_sweeps(["learning_rate=1e-5,3e-5", "per_device_train_batch_size=4,8",
                                     "launch.nproc_per_node=1"])
    assert not problems
    points = grid(sweeps)
    assert [suffix(p) for p in points] == ["lr-1e-5_bs-4_nproc-1", "lr-1e-5_bs-8_nproc-1",
                                           "lr-3e-5_bs-4_nproc-1", "lr-3e-5_bs-8_nproc-1"]
    assert points[1][0].value == 1e-5 and points[1][1].value == 8
    assert suffix([Override("lr_scheduler_type", "cosine", "cosine")]) == "sched-cosine"
    assert suffix([Override("x.y", "a/b c", "a/b c")]) == "y-a-b-c"
    assert point_output_dir("/out", "lr-1e-5") == Override("output_dir", "/out/lr-1e-5", "/out/lr-1e-5")
    assert point_output_dir(None, "lr-1e-5") is None
    _, problems = parse_sweeps(["lr=1,1", "a=1,,2", "b", "c=1", "c=2"])
    assert len(problems) == 4


def test_how_many_run_at_once_and_which_gpus_each_gets():
    cfg = job_config()
    plan = make_plan(cfg, Topology(8, 64), job_id="j", home=Path("/h"), python="p", worker_script="w",
                     workdir="/w", model=model_of(cfg))
    two = dataclasses.replace(plan, nproc_per_node=2)
    assert parallel([two] * 5, Topology(8, 64), None) == (4, 2, "8 GPU(s) / 2 per job")
    assert parallel([two] * 3, Topology(8, 64), None)[0] == 3          # never more slots than jobs
    assert parallel([two] * 5, Topology(8, 64), 6)[:2] == (6, 2)       # --max-parallel decides (GPUs shared)
    g = groups.Group(id="g", name="n", created=0, config_path="c", backend="local", keys=("lr",), overrides=(),
                     max_parallel=4, parallel_why="", ranks_per_job=2, devices=("4", "5", "6", "7"))
    assert [g.devices_for(k) for k in range(3)] == ["4,5", "6,7", "4,5"]
    assert visible_devices(Topology(4, 8), {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == ("4", "5", "6", "7")
    assert visible_devices(Topology(2, 8), {}) == ("0", "1") and visible_devices(Topology(0, 8), {}) == ()
    cpu = make_plan(job_config(), Topology(0, 16), job_id="c", home=Path("/h"),
                    python="p", worker_script="w", workdir="/w", model=model_of(job_config()))
    assert parallel([cpu] * 3, Topology(0, 16), None)[0] == 3          # 16 cores / 1 rank: all three
    assert share_cpu(cpu, 4, Topology(0, 16), {}).env["OMP_NUM_THREADS"] == "4"
    assert share_cpu(cpu, 4, Topology(0, 16), {"OMP_NUM_THREADS": "2"}) is cpu


# --- the local queue ---------------------------------------------------------------------------------------

def _group(tmp_path, n: int, max_parallel: int = 1):
    """A group of ``n`` QUEUED jobs in ``tmp_path/home`` (each with a plan), like ``submit --sweep`` makes."""
    home = tmp_path / "home"
    ledger = Ledger.for_home(home)
    cfg = job_config()
    ids, plans = [f"j{k}" for k in range(1, n + 1)], []
    for job_id in ids:
        plan = make_plan(cfg, Topology(2, 8), job_id=job_id, home=home, python="p", worker_script="w",
                         workdir=str(tmp_path), model=model_of(cfg))
        plan.paths.run_dir.mkdir(parents=True)
        (plan.paths.plan).write_text(json.dumps(plan.to_dict()))
        ledger.create_job(job_id=job_id, name="t", backend="local", run_dir=plan.run_dir, config_path="c",
                          output_dir=plan.output_dir)
        ledger.update_job(job_id, state=JobState.QUEUED, group_id="g")
        plans.append(plan)
    group = groups.Group(id="g", name="t", created=time.time(), config_path="c", backend="local", keys=("lr",),
                         overrides=(), max_parallel=max_parallel, parallel_why="test", ranks_per_job=1,
                         devices=("0", "1"), points=tuple(groups.Point(i, {"lr": k}, f"lr-{k}")
                                                          for k, i in enumerate(ids)))
    groups.write_group(home, group)
    return home, ledger, group, plans


def test_slots_go_first_come_first_served_and_free_up_when_a_job_ends(tmp_path):
    home, ledger, group, _ = _group(tmp_path, 3)
    leases = [Lease.acquire(ledger.get(i).run_dir) for i in group.job_ids]   # every job has a live supervisor
    try:
        assert try_claim(ledger, home, group, "j2") is None       # j1 waits before it
        first = try_claim(ledger, home, group, "j1")
        assert first["slot"] == 0 and first["devices"] == "0"
        ledger.update_job("j1", state=JobState.RUNNING)
        assert try_claim(ledger, home, group, "j2") is None       # the only slot is taken
        ledger.update_job("j1", state=JobState.COMPLETED)
        assert try_claim(ledger, home, group, "j3") is None       # j2 still waits before it
        assert try_claim(ledger, home, group, "j2")["slot"] == 0  # freed by j1's end
    finally:
        for lease in leases:
            lease.release()


def test_a_waiting_job_whose_supervisor_is_gone_does_not_hold_up_the_queue(tmp_path):
    home, ledger, group, _ = _group(tmp_path, 2, max_parallel=2)
    lease = Lease.acquire(ledger.get("j2").run_dir)      # j1 has nobody (its supervisor died while it waited)
    try:
        claim = try_claim(ledger, home, group, "j2")
        assert claim == {**claim, "slot": 0, "devices": "0"}
        lease2 = Lease.acquire(ledger.get("j1").run_dir)
        assert try_claim(ledger, home, group, "j1")["slot"] == 1   # resumed later: it takes the next slot
        lease2.release()
    finally:
        lease.release()


def test_a_queued_job_is_cancelled_without_starting_and_its_turn_sets_its_gpus(tmp_path, monkeypatch):
    home, ledger, group, plans = _group(tmp_path, 2)
    monkeypatch.setenv("ORCHESTRATE_HOME", str(home))
    leases = {i: Lease.acquire(ledger.get(i).run_dir) for i in group.job_ids}
    events: list[str] = []
    try:
        groups.write_claim(ledger.get("j1").run_dir, 0, "0")    # j1 runs in the only slot
        ledger.update_job("j1", state=JobState.RUNNING)
        sup = Supervisor(plans[1], ledger, None, leases["j2"], on_event=events.append,
                         sleep=lambda s: requests.make_request(plans[1].run_dir, requests.CANCEL))
        assert wait_turn(sup, ledger.get("j2")) is False
        job = ledger.get("j2")
        assert job.state is JobState.CANCELLED and not job.attempts and "while queued" in job.message
        sup1 = Supervisor(plans[0], ledger, None, leases["j1"])
        assert wait_turn(sup1, ledger.get("j1")) is True        # holds its slot (say, adopted): goes at once
        assert sup1.plan.env["CUDA_VISIBLE_DEVICES"] == "0"
        # j2, cancelled while it waited, is resumed: it queues anew and takes the slot once j1 has ended
        ledger.update_job("j1", state=JobState.COMPLETED)
        sup2 = Supervisor(plans[1], ledger, None, leases["j2"], on_event=events.append)
        assert wait_turn(sup2, ledger.get("j2")) is True
        assert groups.read_claim(plans[1].run_dir)["slot"] == 0 and ledger.get("j2").state is JobState.PENDING
        # and j1, completed and run again, does not keep its old slot: it waits behind j2
        groups.write_claim(plans[1].run_dir, 0, "0")
        ledger.update_job("j2", state=JobState.RUNNING)
        waits = []
        sup1 = Supervisor(plans[0], ledger, None, leases["j1"], sleep=lambda s: (
            waits.append(s), requests.make_request(plans[0].run_dir, requests.CANCEL)))
        assert wait_turn(sup1, ledger.get("j1")) is False and waits
        assert groups.read_claim(plans[0].run_dir) is None
    finally:
        for lease in leases.values():
            lease.release()


def test_group_verbs_refuse_what_makes_no_sense(workdir, capsys):
    cfg_path = write_config(workdir / "c.yaml", BASE_YAML)
    assert main(["submit", str(cfg_path), "--max-parallel", "2"]) == 2
    assert "only with --sweep" in capsys.readouterr().err
    assert main(["submit", "--dry-run", str(cfg_path), "--sweep", "seed=1,2", "seed=3"]) == 2
    assert "given as KEY=VALUE and as --sweep" in capsys.readouterr().err
    assert main(["status", "--group", "nope"]) == 2 and "no group 'nope'" in capsys.readouterr().err
    assert main(["cancel"]) == 2


def test_a_sweep_is_planned_as_a_whole_before_anything_is_written(workdir, capsys):
    cfg_path = write_config(workdir / "c.yaml", BASE_YAML + "output_dir: out\n")
    assert main(["validate", str(cfg_path), "--sweep", "learning_rate=1e-5,oops", "--sweep", "seed=1,2"]) == 2
    err = capsys.readouterr().err
    assert "point lr-oops_seed-1: learning_rate: expected float" in err and "lr-oops_seed-2" in err
    assert main(["submit", "--dry-run", str(cfg_path), "--sweep", "learning_rate=1e-5,3e-5", "--max-parallel",
                 "1"]) == 0
    out = capsys.readouterr().out
    assert "2 job(s) over learning_rate" in out and "1 at once (--max-parallel 1)" in out
    assert f"output_dir {workdir / 'out' / 'lr-3e-5'}" in out
    assert not (workdir.parent / "home").exists()

"""SLURM backend, fast: config validation, the state table, parsers of recorded real output,
the generated sbatch script (golden per profile), hostile paths, the node launcher's signal
forwarding, and the backend against a fake SLURM at the subprocess seam.

Goldens: ``tests/golden/slurm/<profile>.dryrun.txt`` hold ``describe_plan`` of a plan using each
profile of ``slurm_templates/``; regenerate with ``UPDATE_GOLDEN=1 pytest tests/test_slurm_unit.py``.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers import model_of

from orchestrator.backends import get_backend
from orchestrator.backends.base import AttemptHandle
from orchestrator.backends.slurm import scontrol
from orchestrator.backends.slurm.node import first_node_address, run_agent
from orchestrator.backends.slurm.queue import SlurmQueue
from orchestrator.backends.slurm.records import exit_status, publish, record_submit_failure
from orchestrator.backends.slurm.states import (
    SLURM_STATES,
    lookup,
    normalize_state,
    parse_sacct,
    parse_sacct_steps,
    parse_sbatch_parsable,
    parse_squeue,
)
from orchestrator.backends.slurm.steps import NODES_FILE, Placement, SlurmStepBackend
from orchestrator.backends.slurm.submit import preflight, submit_allocation
from orchestrator.config import ConfigError, JobConfig
from orchestrator.config.launch import LaunchSettings, parse_launch
from orchestrator.config.slurm import available_profiles, parse_slurm, parse_time
from orchestrator.dashboard.plan_view import describe_plan
from orchestrator.plan import make_plan
from orchestrator.plan import slurm as slurm_plan
from orchestrator.plan.topology import Topology
from orchestrator.states import Failure, JobState
from orchestrator.supervise.classify import Outcome, classify
from orchestrator.worker import channel

GOLDEN = Path(__file__).resolve().parent / "golden" / "slurm"
HOME = Path("/home/u/.orchestrate")
JOB = "demo-0101-abcdef"
PROFILES = sorted(available_profiles())
TRAINING = {"model_id": "/models/tiny", "dataset_path": "/data/chat", "max_steps": 40, "save_steps": 10,
            "fsdp": True, "fsdp_config": {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}}
HOSTILE = "/tmp/we ird 'home' \"q\" $(touch pwned) `id` ;&|"


def slurm_config(slurm: dict, nproc: int | str = 2, name: str = "demo") -> JobConfig:
    settings, problems = parse_slurm(slurm, required=True)
    assert problems == []
    launch = LaunchSettings(name=name, backend="slurm", nproc_per_node=nproc, slurm=settings)
    return JobConfig(source=Path("/cfg/demo.yaml"), training=dict(TRAINING), launch=launch)


def plan_of(cfg: JobConfig, home: Path = HOME, **kw):
    args = dict(job_id=JOB, home=home, python="/opt/venv/bin/python", worker_script="/opt/orchestrate/train_worker.py",
                workdir="/home/u/project")
    return make_plan(cfg, Topology(gpus=0, cpus=2), **{**args, "model": model_of(cfg), **kw})


# ---- config validation -------------------------------------------------------------------

@pytest.mark.parametrize("profile", PROFILES)
def test_every_shipped_profile_is_valid(profile):
    settings, problems = parse_slurm({"profile": profile}, required=True)
    assert problems == [] and settings["time_min"] >= 1 and settings["profile"] == profile


@pytest.mark.parametrize("text, minutes", [
    ("30", 30), (90, 90), ("10:30", 11), ("01:00:00", 60), ("100:00:00", 6000), ("2-00", 2880),
    ("1-12:30", 2190), ("1-00:00:01", 1441)])
def test_time_formats(text, minutes):
    settings, problems = parse_slurm({"time": text}, required=True)
    assert problems == [] and settings["time_min"] == minutes


@pytest.mark.parametrize("bad", ["1h", "1:2:3:4", "10:61", "1-25:00", "0", "-5", "", True, 1.5, "1-00:00:99"])
def test_bad_time_formats_name_every_valid_form(bad):
    _, problem = parse_time(bad)
    assert problem and ("MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS" in problem or "longer than 0" in problem)


def test_every_problem_at_once_with_key_paths_and_hints():
    _, problems = parse_slurm({"partiton": "gpu", "time": "2h", "nodes": 0, "mem": "4X", "signal": "HUP",
                               "extra": {"time": "5", "export": "NONE", "bad opt": 1, "reservation": "r"},
                               "setup": ["ok", "two\nlines"], "exclusive": "yes"}, required=True)
    text = "\n".join(problems)
    for want in ["launch.slurm.partiton: unknown key (did you mean 'partition'?)", "launch.slurm.time: expected MM",
                 "launch.slurm.nodes: expected a whole number >= 1", "launch.slurm.mem: expected memory",
                 "launch.slurm.signal: expected USR1, USR2 or TERM", "launch.slurm.extra.time: not allowed here (use "
                 "launch.slurm.time)", "launch.slurm.extra.export: not allowed here (--export would strip",
                 "launch.slurm.extra.bad opt: not an sbatch option name", "launch.slurm.setup: expected",
                 "launch.slurm.exclusive: expected true or false"]:
        assert want in text
    assert len(problems) == 10 and "required" not in text  # a bad time is not also reported missing


def test_profile_is_overridden_field_by_field_and_extra_is_merged():
    settings, problems = parse_slurm({"profile": "gpu-cluster", "nodes": 4, "time": "02:00:00",
                                      "extra": {"mail-type": "END"}}, required=True)
    assert problems == []
    assert settings["nodes"] == 4 and settings["time_min"] == 120 and settings["gpus_per_node"] == 8
    assert settings["extra"] == {"hint": "nomultithread", "mail-type": "END"}


def test_unknown_profile_lists_the_available_ones(tmp_path):
    (tmp_path / "site.yaml").write_text("partition: p\ntime: 10\nnodse: 2\ndescription: x\n")
    _, problems = parse_slurm({"profile": "gpu-clustr"}, required=True, dirs=[tmp_path])
    assert "no profile 'gpu-clustr'" in problems[0] and "available: ['site']" in problems[0]
    _, problems = parse_slurm({"profile": "site"}, required=True, dirs=[tmp_path])
    assert problems == [f"{tmp_path / 'site.yaml'}: nodse: unknown key (did you mean 'nodes'?)"]


def test_time_is_required_only_for_backend_slurm():
    assert parse_slurm(None, required=False)[1] == []
    assert "launch.slurm.time: required" in parse_slurm(None, required=True)[1][0]
    settings, problems = parse_launch({"backend": "slurm", "nproc_per_node": 2, "slurm": {"profile": "local-lab"}})
    assert problems == [] and settings.slurm["partition"] == "debug"
    _, problems = parse_launch({"backend": "slurm", "slurm": {"tme": 5}})
    assert problems == ["launch.slurm.tme: unknown key (did you mean 'time'?)",
                        "launch.slurm.time: required for backend slurm (the job's time limit, e.g. 04:00:00 or "
                        "2-00:00:00); set it here or in the profile"]


# ---- the state table ------------------------------------------------------------------------

_P, _R, _Q, _C, _F, _X = (JobState.PENDING, JobState.RUNNING, JobState.RESUMING, JobState.COMPLETED,
                          JobState.FAILED, JobState.CANCELLED)


@pytest.mark.parametrize("state, active, job_state, verdict", [
    ("PENDING", True, _P, None), ("RUNNING", True, _R, None), ("REQUEUED", True, _Q, None),
    ("COMPLETING", True, _R, None), ("SUSPENDED", True, _R, None), ("CONFIGURING", True, _R, None),
    ("COMPLETED", False, _C, None), ("FAILED", False, _F, None), ("CANCELLED", False, _X, Failure.CANCELLED),
    ("TIMEOUT", False, _Q, Failure.PREEMPTED), ("PREEMPTED", False, _Q, Failure.PREEMPTED),
    ("NODE_FAIL", False, _Q, Failure.WORKER_LOST), ("BOOT_FAIL", False, _Q, Failure.WORKER_LOST),
    ("OUT_OF_MEMORY", False, _F, Failure.OOM), ("DEADLINE", False, _F, Failure.USER_ERROR)])
def test_state_table(state, active, job_state, verdict):
    row = SLURM_STATES[state]
    assert (row.active, row.job_state, row.verdict) == (active, job_state, verdict)


def test_state_names_are_normalised():
    assert normalize_state("CANCELLED by 1000") == "CANCELLED"
    assert normalize_state("CANCELLED+") == "CANCELLED"
    assert normalize_state("CA") == "CANCELLED" and normalize_state("OOM") == "OUT_OF_MEMORY"
    assert lookup("SOMETHING_PENDING").active and not lookup("WEIRD_END").active


@pytest.mark.parametrize("verdict, worker_state, want", [
    ("CANCELLED", "stopped", Failure.CANCELLED),      # scancel: the ranks stopped gracefully, still the user's cancel
    ("CANCELLED", "completed", Failure.COMPLETED),    # finished before the cancel landed: nothing lost
    ("PREEMPTED", None, Failure.PREEMPTED),           # TIMEOUT/PREEMPTED: resume from the verified checkpoint
    ("OOM", None, Failure.OOM), ("WORKER_LOST", None, Failure.WORKER_LOST), (None, "stopped", Failure.PREEMPTED)])
def test_scheduler_verdict_in_the_one_classify_table(verdict, worker_state, want):
    agent = {"exit_code": 75, "failures": {}, "scheduler_failure": verdict}
    assert classify(Outcome(returncode=75, agent=agent, worker_state=worker_state)) is want


# ---- parsers, on recorded real output (Slurm 22.05.8, scripts/slurm-lab.sh) ----------------------

BANNER = "Welcome to the lab cluster! Quota on /home: 91% used. Job 7 of the docs: see https://wiki\n"
SBATCH_OUT = BANNER + "22\n"
SQUEUE_OUT = BANNER + textwrap.dedent("""\
    20|CANCELLED|None|n2
    16|COMPLETED|None|n1
    17|FAILED|NonZeroExitCode|n1
    19|PENDING|BeginTime|
    18|RUNNING|None|n2
    21|RUNNING|None|n2
    25|TIMEOUT|TimeLimit|n1
    """)
SACCT_OUT = BANNER + "JobIDRaw|State|ExitCode|Reason|NodeList\n" + textwrap.dedent("""\
    16|COMPLETED|0:0|None|n1
    16.batch|COMPLETED|0:0||n1
    17|FAILED|3:0|None|n1
    18|RUNNING|0:0|None|n2
    19|PENDING|0:0|BeginTime|None assigned
    20|CANCELLED by 0|0:0|None|n2
    21|REQUEUED|0:0|None|n1
    21|RUNNING|0:0|BeginTime|n2
    25|TIMEOUT|0:0|None|n1
    """)


def test_sbatch_parsable_skips_a_login_banner():
    assert parse_sbatch_parsable(SBATCH_OUT) == "22"
    assert parse_sbatch_parsable("sbatch: note: 3 jobs queued\n4242;lab\n") == "4242"
    with pytest.raises(ValueError):
        parse_sbatch_parsable(BANNER)


def test_squeue_and_sacct_parsers_on_recorded_output():
    q = parse_squeue(SQUEUE_OUT)
    assert {k: v.state for k, v in q.items()} == {"20": "CANCELLED", "16": "COMPLETED", "17": "FAILED",
                                                  "19": "PENDING", "18": "RUNNING", "21": "RUNNING",
                                                  "25": "TIMEOUT"}
    assert q["19"].reason == "BeginTime" and q["19"].active and not q["20"].active
    a = parse_sacct(SACCT_OUT)
    assert sorted(a) == ["16", "17", "18", "19", "20", "21", "25"]  # no banner, header or step line
    assert (a["17"].exit_code, a["17"].state) == (3, "FAILED")
    assert a["20"].state == "CANCELLED" and a["20"].raw_state == "CANCELLED by 0"
    assert a["21"].state == "RUNNING"  # --duplicates: the latest record of a requeued job wins
    assert a["25"].row.verdict is Failure.PREEMPTED and q["25"].reason == "TimeLimit"


# ---- planning: layout, per-node command, the sbatch script -------------------------------------

@pytest.mark.parametrize("slurm, nproc, want", [
    ({"time": 5, "gpus_per_node": 8, "nodes": 2}, "auto", (2, 8, "cuda", None)),
    ({"time": 5, "gpus_per_node": 8}, 4, (1, 4, "cuda", None)),
    ({"time": 5, "cpus_per_task": 8}, 2, (1, 2, "cpu", "4")),
    ({"time": 5, "nodes": 2}, "auto", (2, 1, "cpu", "1")),
])
def test_layout_comes_from_the_allocation_not_this_host(slurm, nproc, want):
    plan = plan_of(slurm_config(slurm, nproc=nproc))
    assert (plan.nnodes, plan.nproc_per_node, plan.device, plan.env.get("OMP_NUM_THREADS")) == want
    assert plan.world_size == want[0] * want[1] and plan.worker_config.get("use_cpu") is (want[2] == "cpu" or None)


def test_more_processes_than_gpus_is_refused():
    with pytest.raises(ConfigError) as e:
        plan_of(slurm_config({"time": 5, "gpus_per_node": 2}, nproc=4))
    assert "launch.nproc_per_node: 4 processes per node but launch.slurm.gpus_per_node is 2" in e.value.problems


def test_per_node_command_rendezvous_and_port():
    plan = plan_of(slurm_config({"profile": "local-lab", "nodes": 2}))
    argvs = [slurm_plan.node_argv(plan, 3, node=n, nnodes=2, endpoint="10.0.0.1:20123", rdzv_id="123",
                                  python="/py") for n in (0, 1)]
    for node, argv in enumerate(argvs):
        assert argv[:3] == ["/py", "-m", "orchestrator.worker.agent"]
        assert {"--nnodes=2", f"--node-rank={node}", "--nproc-per-node=2", "--rdzv-backend=static",
                "--rdzv-endpoint=10.0.0.1:20123", "--rdzv-id=123", "--max-restarts=0"} <= set(argv)
        assert f"--log-dir={HOME}/runs/{JOB}/attempts/3/ranks/node{node}" in argv
        assert argv[-3:] == [plan.worker_script, "--config", f"{HOME}/runs/{JOB}/worker_config.yaml"]
    assert slurm_plan.rendezvous_port("123", 1) == slurm_plan.rendezvous_port("123", 1) == 20862
    assert slurm_plan.rendezvous_port("123", 2) == 20863                # the next step: another port
    assert slurm_plan.rendezvous_port("98765", 1) == 21356 and slurm_plan.rendezvous_port("7_3", 1) == 20512
    env = slurm_plan.node_env(plan, 3, "/ck/checkpoint-8", node=1, slurm_job_id="123")
    assert env[channel.ENV_ATTEMPT_DIR] == f"{HOME}/runs/{JOB}/attempts/3/nodes/1"
    assert env[channel.ENV_RESUME_FROM] == "/ck/checkpoint-8" and env["ACCELERATE_USE_FSDP"] == "1"
    assert env[channel.ENV_STOP_SIGNALS] == "SIGUSR2"
    usr1 = plan_of(slurm_config({"profile": "local-lab", "signal": "USR1"}))
    assert slurm_plan.node_env(usr1, 1, None, node=0, slurm_job_id="1")[channel.ENV_STOP_SIGNALS] == "SIGUSR2,SIGUSR1"


@pytest.mark.parametrize("profile", PROFILES)
def test_dry_run_golden_for_every_profile(profile):
    plan = plan_of(slurm_config({"profile": profile}, nproc="auto" if profile != "local-lab" else 2))
    text = describe_plan(plan)
    path = GOLDEN / f"{profile}.dryrun.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"dry-run output changed; UPDATE_GOLDEN=1 pytest {__file__} if intended"


@pytest.mark.parametrize("profile", PROFILES)
def test_preview_is_exactly_what_submitit_writes(profile, tmp_path):
    from orchestrator.backends.slurm.submit import _executor_class

    plan = plan_of(slurm_config({"profile": profile}, nproc="auto" if profile != "local-lab" else 2), home=tmp_path)
    ex = _executor_class()(slurm_plan.submitit_folder(plan), python=shlex.quote(slurm_plan.job_python(plan)))
    ex.update_parameters(**slurm_plan.executor_parameters(plan))
    assert ex._make_submission_file_text(ex._submitit_command_str, "uid") == slurm_plan.sbatch_script(plan)


def test_hostile_paths_are_quoted_in_the_sbatch_script(tmp_path):
    plan = plan_of(slurm_config({"profile": "local-lab", "setup": ["module load x"]}), home=Path(HOSTILE),
                   python=HOSTILE + "/py")
    script = slurm_plan.sbatch_script(plan)
    (tmp_path / "s.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "s.sh")]).returncode == 0
    folder = f"{HOSTILE}/runs/{JOB}/slurm"
    opts = dict(shlex.split(ln[len("#SBATCH "):])[0].split("=", 1) for ln in script.splitlines()
                if ln.startswith("#SBATCH --") and "=" in ln)
    assert opts["--output"] == f"{folder}/%j_0_log.out" and opts["--error"] == f"{folder}/%j_0_log.err"
    # the batch step runs the supervisor itself (no srun): the last line is submitit's entry, quoted
    command = [ln for ln in script.splitlines() if ln.strip() and not ln.startswith("#")][-1]
    assert not command.startswith("srun ")
    assert shlex.split(command)[-5:] == [HOSTILE + "/py", "-u", "-m", "submitit.core._submit", folder]
    assert not Path("pwned").exists()


def test_a_newline_in_a_path_is_refused():
    with pytest.raises(ConfigError) as e:
        plan_of(slurm_config({"profile": "local-lab"}), home=Path("/tmp/a\nb"))
    assert "contains a newline" in e.value.problems[0]


# ---- supervision inside the allocation: the step backend against a fake SLURM --------------------

SCONTROL_JOB = ("JobId=33 JobName=demo UserId=root(0) JobState=RUNNING Reason=None Requeue=1 Restarts=0 BatchFlag=1 "
                "RunTime=00:00:04 TimeLimit=00:30:00 StartTime=2026-12-02T19:26:13 EndTime={end} Partition=debug "
                "NodeList=n[1-2] BatchHost=n1 NumNodes=2 NumCPUs=2 NumTasks=2 CPUs/Task=1\n")
SCONTROL_NODE = "NodeName={n} Arch=x86_64 CoresPerSocket=1 NodeAddr=127.0.0.1 NodeHostName=localhost Port=6820 State={s}\n"


class FakeSlurm:
    """Answers scontrol/sacct/squeue/scancel like Slurm 22.05 (recorded lines, scripts/slurm-lab.sh)."""

    def __init__(self, nodes=None, time_left=3600.0, steps=None, requeue_rc=0):
        self.nodes = nodes or {"n1": "MIXED", "n2": "MIXED"}
        self.time_left, self.steps, self.requeue_rc, self.calls = time_left, dict(steps or {}), requeue_rc, []

    def __call__(self, argv, input=None, timeout=60.0):
        self.calls.append(argv)
        if argv[:3] == ["scontrol", "show", "hostnames"]:
            return 0, "".join(f"{n}\n" for n in ("n1", "n2")), ""
        if argv[:4] == ["scontrol", "--oneliner", "show", "job"]:
            end = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + self.time_left))
            return 0, SCONTROL_JOB.format(end=end), ""
        if argv[:4] == ["scontrol", "--oneliner", "show", "node"]:
            return 0, "".join(SCONTROL_NODE.format(n=n, s=self.nodes[n]) for n in argv[4].split(",")
                              if n in self.nodes), ""
        if argv[:2] == ["scontrol", "requeue"]:
            return self.requeue_rc, "", "" if not self.requeue_rc else "Requested operation is presently disabled"
        if argv[0] == "sacct":
            sid = argv[-1].split("=", 1)[1]
            return 0, BANNER + (f"{sid}|{self.steps[sid]}|0:0||n[1-2]\n" if sid in self.steps else ""), ""
        if argv[0] == "squeue":
            return 0, "33.batch|batch\n", ""
        return 0, "", ""


def step_plan(tmp_path, nodes=2, **slurm):
    return plan_of(slurm_config({"profile": "local-lab", "nodes": nodes, **slurm}, nproc=1), home=tmp_path)


def test_placement_uses_the_usable_nodes_and_excludes_one_that_failed_twice(tmp_path):
    plan = step_plan(tmp_path, nodes=1)
    fake = FakeSlurm()
    backend = SlurmStepBackend("33", runner=fake)
    assert backend.placement(plan) == Placement(nodes=("n1",))
    fake.nodes["n1"] = "DOWN*"
    assert backend.placement(plan).nodes == ("n2",)                     # a node SLURM set down is not used
    fake.nodes["n1"] = "MIXED"
    channel.write_json_atomic(tmp_path / "runs" / JOB / "slurm" / NODES_FILE, {"n1": 2})
    assert backend.placement(plan) == Placement(nodes=("n2",), exclude=("n1",))


def test_too_few_nodes_or_the_time_limit_move_the_job_to_a_new_allocation(tmp_path):
    plan = step_plan(tmp_path)
    fake = FakeSlurm()
    backend = SlurmStepBackend("33", runner=fake)
    assert backend.placement(plan).nodes == ("n1", "n2") and backend.placement(plan).relocate is None
    fake.nodes["n2"] = "IDLE+DRAIN"
    where = backend.placement(plan)
    assert where.relocate == "1 usable node(s) left of 2 (lost: n2)" and where.exclude == ("n2",)
    fake.nodes["n2"], fake.time_left = "MIXED", 100                     # signal_delay_s 90 + 60 s margin
    assert backend.placement(plan, Failure.PREEMPTED).relocate is None  # requeued just now: a fresh allocation
    backend.last_allocation_attempt = 3                                 # a stop of an attempt run here ...
    assert backend.placement(plan, Failure.KILLED).relocate is None     # a crash: a new step here
    assert "time limit" in backend.placement(plan, Failure.PREEMPTED).relocate   # ... close to the limit


def test_with_min_nodes_a_lost_node_shrinks_the_job_in_place_if_the_global_batch_allows(tmp_path):
    plan = step_plan(tmp_path, nodes=2, min_nodes=1)
    fake = FakeSlurm(nodes={"n1": "MIXED", "n2": "DOWN*"})
    backend = SlurmStepBackend("33", runner=fake)
    assert backend.placement(plan) == Placement(nodes=("n1",), resize=1)
    plan3 = step_plan(tmp_path, nodes=2, min_nodes=2)                      # min_nodes not met: a new allocation
    assert backend.placement(plan3).relocate.startswith("1 usable node(s) left of 2")


def test_relocation_is_a_requeue_and_else_a_new_submission_from_inside(tmp_path, monkeypatch):
    plan = step_plan(tmp_path)
    fake = FakeSlurm()
    backend = SlurmStepBackend("33", runner=fake)
    said, new = backend.relocate(plan, Placement(relocate="the time limit"))
    assert new is None and said.startswith("requeued as SLURM job 33") and fake.calls[-1] == ["scontrol", "requeue", "33"]
    submitted = []
    monkeypatch.setattr("orchestrator.backends.slurm.submit.submit_allocation",
                        lambda plan, home, exclude: submitted.append(exclude) or "34")
    said, new = backend.relocate(plan, Placement(relocate="a lost node", exclude=("n2",)))
    assert new == "34" and "submitted a new allocation, SLURM job 34" in said and submitted == [("n2",)]
    fake.requeue_rc = 1
    said, new = backend.relocate(plan, Placement(relocate="the time limit"))
    assert new == "34" and "SLURM refused the requeue" in said


def _step_dir(tmp_path, nodes: dict[int, dict], allocation="33") -> Path:
    adir = tmp_path / "runs" / JOB / "attempts" / "1"
    for node, files in nodes.items():
        for name, data in files.items():
            channel.write_json_atomic(adir / "nodes" / str(node) / name, data)
    channel.write_json_atomic(adir / "slurm.json", {"job_id": allocation, "nodes": ["n1", "n2"][:len(nodes)],
                                                    "nnodes": len(nodes)})
    return adir


def test_a_step_that_ended_has_its_nodes_records_merged(tmp_path):
    adir = _step_dir(tmp_path, {
        0: {"agent.json": {"exit_code": 0, "failures": {}}, "node.json": {"ended": 1, "slurm_step_id": "4"}},
        1: {"agent.json": {"exit_code": 0, "failures": {}}, "node.json": {"ended": 1, "slurm_step_id": "4"},
            "status.json": {"state": "completed"}, "error-rank3.json": {"rank": 3, "type": "X"}}})
    backend = SlurmStepBackend("34", runner=FakeSlurm(steps={"33.4": "COMPLETED"}), sleep=lambda s: None)
    handle = AttemptHandle(JOB, 1, 0, str(adir), external_id="33")       # adopted: from an earlier allocation
    assert backend.poll(handle) == 0
    agent = channel.read_json(adir / "agent.json")
    assert agent["slurm"]["job_id"] == "33.4" and agent["scheduler_failure"] is None
    assert channel.read_json(adir / "status.json") == {"state": "completed"} and (adir / "error-rank3.json").is_file()
    assert channel.read_json(adir / "slurm.json")["step_id"] == "4"


def test_a_failed_step_counts_a_failure_against_each_node_slurm_lost(tmp_path):
    adir = _step_dir(tmp_path, {0: {"agent.json": {"exit_code": 1, "failures": {}}, "node.json": {
        "ended": 1, "slurm_step_id": "2"}}, 1: {"node.json": {"started": 1, "slurm_step_id": "2"}}})
    fake = FakeSlurm(nodes={"n1": "MIXED", "n2": "DOWN*"}, steps={"33.2": "NODE_FAIL"})
    backend = SlurmStepBackend("33", runner=fake, sleep=lambda s: None)
    assert backend.poll(AttemptHandle(JOB, 1, 0, str(adir), external_id="34")) == 1
    assert classify(Outcome(1, agent=channel.read_json(adir / "agent.json"))) is Failure.WORKER_LOST
    assert channel.read_json(tmp_path / "runs" / JOB / "slurm" / NODES_FILE) == {"n2": 1}


def test_kill_and_signal_are_scancel_of_the_step(tmp_path):
    adir = _step_dir(tmp_path, {0: {"node.json": {"started": 1, "slurm_step_id": "5"}}})
    fake = FakeSlurm()
    backend = SlurmStepBackend("33", runner=fake)
    handle = AttemptHandle(JOB, 1, 0, str(adir), external_id="33")
    assert backend.kill(handle) == [] and ["scancel", "33.5"] in fake.calls
    backend.signal(handle, "SIGUSR2")
    assert fake.calls[-1] == ["scancel", "--signal=USR2", "33.5"]
    assert backend.attempt_facts(handle) == {"scheduler_job_id": "33", "nodes": "n1", "external_id": "33.5",
                                             "in_place": 0}


class _Running:
    """A stand-in for the srun process of a running step."""

    pid = 0

    def poll(self):
        return None


def test_a_step_slurm_never_signalled_is_signalled_once_when_the_time_limit_is_near(tmp_path):
    # SLURM's --signal reaches only the steps running when it is sent (and up to a minute early): a step
    # started after it is told by the supervisor itself once the time left is under the signal delay.
    adir = _step_dir(tmp_path, {0: {"node.json": {"started": 1, "slurm_step_id": "5"}}})
    now = [0.0]
    fake = FakeSlurm(time_left=600)
    backend = SlurmStepBackend("33", runner=fake, clock=lambda: now[0])
    backend._deadline = ("USR2", 90)
    backend._procs[1] = _Running()
    handle = AttemptHandle(JOB, 1, 0, str(adir), external_id="33")
    assert backend.poll(handle) is None and not any(c[0] == "scancel" for c in fake.calls)
    fake.time_left, now[0] = 60, 5.0                     # an admin shortened the limit: read again after 15 s
    assert backend.poll(handle) is None and not any(c[0] == "scancel" for c in fake.calls)
    now[0] = 20.0
    assert backend.poll(handle) is None and fake.calls[-1] == ["scancel", "--signal=USR2", "33.5"]
    now[0] = 40.0
    backend.poll(handle)
    assert [c for c in fake.calls if c[0] == "scancel"] == [["scancel", "--signal=USR2", "33.5"]]   # once
    sent = [json.loads(line) for line in (adir / "signals.jsonl").read_text().splitlines()]
    assert [(r["signal"], r["by"]) for r in sent] == [("USR2", "supervisor")] and sent[0]["time_left_s"] < 90


@pytest.mark.parametrize("message, want", [
    ("sbatch: error: invalid partition specified: nosuch", Failure.USER_ERROR),
    ("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation", Failure.WORKER_LOST)])
def test_a_refused_submission_is_recorded_clearly(tmp_path, message, want):
    adir = tmp_path / "a"
    adir.mkdir()
    record_submit_failure(adir, message)
    outcome = Outcome(returncode=2, agent=channel.read_json(adir / "agent.json"),
                      error=channel.read_json(adir / "error-rank0.json"))
    assert classify(outcome) is want and outcome.error["message"] == message


def test_submit_through_submitit_reads_the_id_past_a_banner(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "sbatch"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {shlex.quote(str(tmp_path / 'argv'))}\n"
                    "echo 'Welcome! Maintenance on Friday (job 99 of the docs).'\necho '4242;lab'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    plan = plan_of(slurm_config({"profile": "local-lab"}), home=tmp_path / "home")
    assert submit_allocation(plan, str(tmp_path / "home"), exclude=("n2",)) == "4242"
    argv = (tmp_path / "argv").read_text().split()
    assert argv[0] == "--parsable" and argv[1].endswith(".sh")
    script = (slurm_plan.submitit_folder(plan) / "4242_submission.sh").read_text()
    assert "#SBATCH --exclude=n2" in script and "#SBATCH --requeue" in script and "#SBATCH --no-kill" in script
    assert (slurm_plan.submitit_folder(plan) / "4242_submitted.pkl").is_file()


def test_preflight_names_the_setting_slurm_refuses(monkeypatch):
    def runner(argv, input=None, timeout=60.0):
        assert argv == ["sbatch", "--test-only"] and "#SBATCH --partition=nosuch" in input
        return 1, "", ("sbatch: error: invalid partition specified: nosuch\n"
                       "allocation failure: Invalid partition name specified\n")

    monkeypatch.setattr("orchestrator.backends.slurm.submit.shutil.which", lambda name: f"/usr/bin/{name}")
    plan = plan_of(slurm_config({"profile": "local-lab", "partition": "nosuch"}))
    assert preflight(plan, runner) == [
        "launch.slurm.partition: SLURM refuses the job: sbatch: error: invalid partition specified: nosuch",
        "launch.slurm.partition: SLURM refuses the job: allocation failure: Invalid partition name specified"]


def test_exit_status_of_an_attempt():
    assert exit_status([0, 0], 0, None) == 0
    assert exit_status([75, 75], 0, None) == 75
    assert exit_status([143, 1], 0, None) == 1          # node 0 was stopped because node 1 failed
    assert exit_status([0], 1, None) == 1               # a node left no record
    assert exit_status([], 2, parse_sacct("7|FAILED|2:0|None|n1\n")["7"]) == 2


def test_the_slurm_backend_exists_only_inside_an_allocation(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ValueError, match="inside its allocation"):
        get_backend("slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "33")
    assert get_backend("slurm").name == "slurm" and get_backend("slurm").job == "33"


def test_step_command_and_scontrol_parsers():
    plan = plan_of(slurm_config({"profile": "local-lab", "nodes": 2}))
    argv = slurm_plan.step_argv(plan, 3, ["n1", "n2"], "/py")
    assert argv[:4] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1"]
    assert {"--nodelist=n1,n2", "--kill-on-bad-exit=1", "--overlap", f"--job-name=orchestrate-{JOB}-a3",
            "--cpus-per-task=2"} <= set(argv)
    assert argv[-5:] == ["/py", "-u", "-m", "orchestrator.backends.slurm.node",
                         f"{HOME}/runs/{JOB}/attempts/3/step.json"]
    p = scontrol.pairs(SCONTROL_JOB)
    assert (p["JobState"], p["NodeList"], p["Requeue"]) == ("RUNNING", "n[1-2]", "1")
    assert scontrol.usable("MIXED") and scontrol.usable("IDLE") and not scontrol.usable("DOWN*")
    assert not scontrol.usable("IDLE+DRAIN") and not scontrol.usable("")
    assert parse_sacct_steps("33.0|COMPLETED|0:0||n[1-2]\n33|RUNNING|0:0|None|n1\n33.batch|RUNNING|0:0||n1\n") \
        .keys() == {"33.0"}


# ---- inside the job: the first node's address, signals passed on to the ranks ----------------------

def test_first_node_address_falls_back_to_slurms_node_addr():
    assert first_node_address(["localhost", "n2"]) == "localhost"

    def scontrol(argv, **kw):
        assert argv == ["scontrol", "--oneliner", "show", "node", "no-such-node.invalid"]
        return subprocess.CompletedProcess(argv, 0, "NodeName=n1 Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=x\n", "")

    assert first_node_address(["no-such-node.invalid"], run=scontrol) == "10.1.2.3"


FAKE_AGENT = """\
import subprocess, sys
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
sys.exit(rank.wait())
"""
FAKE_RANK = """\
import pathlib, signal, sys, time
got = []
signal.signal(signal.SIGUSR2, lambda s, f: got.append(s))
out = pathlib.Path(sys.argv[1])
(out.parent / "ready").write_text("1")
end = time.time() + 30
while not got and time.time() < end:
    time.sleep(0.02)
out.write_text("USR2" if got else "none")
sys.exit(75 if got else 1)
"""


def test_the_launcher_survives_usr2_and_passes_it_to_the_ranks(tmp_path):
    """SLURM signals the agent too: it must ignore USR2 (default: die), and the ranks must get it."""
    import psutil

    out = tmp_path / "rank-got"
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}

    def preempt():
        end = time.time() + 30
        while not (tmp_path / "ready").exists() and time.time() < end:
            time.sleep(0.02)
        agent = next(p for p in psutil.Process().children() if "rank = subprocess.Popen" in " ".join(p.cmdline()))
        agent.send_signal(signal.SIGUSR2)          # like SLURM: every process of the step ...
        os.kill(os.getpid(), signal.SIGUSR2)        # ... including this launcher, which passes it on

    t = threading.Thread(target=preempt)
    t.start()
    try:
        rc, received = run_agent([sys.executable, "-c", FAKE_AGENT, FAKE_RANK, str(out)], dict(os.environ),
                                 str(tmp_path), tmp_path / "torchrun.log", adopt_orphans=False)
    finally:
        t.join()
        for s, h in previous.items():
            signal.signal(s, h)
    assert rc == 75 and out.read_text() == "USR2"          # the agent lived on and passed the rank's code on
    assert [r["signal"] for r in received] == ["SIGUSR2"]


def test_a_step_that_failed_before_any_node_started_is_a_user_error(tmp_path):
    adir = tmp_path / "attempts" / "1"
    adir.mkdir(parents=True)
    (adir / "srun.log").write_text("slurmstepd: error: execve(): /opt/nope/bin/python: No such file or directory\n"
                                   "srun: error: n1: task 0: Exited with exit code 2\n")
    rc = publish(adir, 2, parse_sacct("42|FAILED|127:0|NonZeroExitCode|n[1-2]\n")["42"], adir / "srun.log")
    error = channel.read_json(adir / "error-rank0.json")
    outcome = Outcome(returncode=rc, agent=channel.read_json(adir / "agent.json"), error=error)
    assert rc == 127 and classify(outcome) is Failure.USER_ERROR
    assert "failed before any node started training" in error["message"] and "No such file or directory" in \
        error["message"]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_queue_batches_and_backs_off():
    states = {"1": "RUNNING", "2": "PENDING", "3": "COMPLETED"}
    calls = []

    def runner(argv, input=None, timeout=60.0):
        calls.append(argv)
        ids = argv[-1].split("=", 1)[1].split(",")
        if argv[0] == "squeue":
            return 0, BANNER + "".join(f"{i}|{states[i]}|None|n1\n" for i in ids if i != "3"), ""
        return 0, BANNER + "".join(f"{i}|{states[i]}|0:0|None|n1\n" for i in ids), ""

    clock = Clock()
    q = SlurmQueue(runner, clock, min_s=1.0, max_s=5.0)
    for j in ("1", "2", "3"):
        q.watch(j)
    assert q.info("1").state == "RUNNING" and q.info("3").state == "COMPLETED"
    assert [c[0] for c in calls] == ["squeue", "sacct"]               # one batched call each
    assert calls[0][-1] == "--jobs=1,2,3" and calls[1][-1] == "--jobs=3"
    intervals = []
    for _ in range(5):
        clock.t += 10
        q.info("1")
        intervals.append(q.interval)
    assert intervals == [1.5, 2.25, 3.375, 5.0, 5.0]                  # nothing changes: back off
    states["1"] = "COMPLETING"
    clock.t += 10
    q.info("1")
    assert q.interval == 1.0                                          # a change: look again soon
    assert "3" not in q._watched                                     # ended jobs are not asked about again


ORPHANING = """\
import json, subprocess, sys
from orchestrator.backends.slurm.node import become_subreaper, end_orphans
assert become_subreaper()
# an "agent" that starts a "rank" in a session of its own and dies at once, like a killed torchrun
agent = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
    "start_new_session=True); sys.exit(0)"])
agent.wait()
print(json.dumps(end_orphans(grace_s=5)))
"""


def test_ranks_orphaned_by_a_dead_agent_are_adopted_and_ended():
    import json

    import psutil

    r = subprocess.run([sys.executable, "-c", ORPHANING], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    orphans = json.loads(r.stdout)
    assert len(orphans) == 1 and not psutil.pid_exists(orphans[0])

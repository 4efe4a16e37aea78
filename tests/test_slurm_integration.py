"""The SLURM backend against a real cluster: the one-host lab of ``scripts/slurm-lab.sh``
(Slurm 22.05, two virtual nodes n1/n2, sacct through slurmdbd), which ``.ci/run`` starts.

(a) the demo completes through SLURM; (b) a 2-node job completes with world size 2; (c) a rank
killed inside a running job is resumed from the verified checkpoint, while a ``scancel`` from
outside is the user's cancel and ``orchestrate cancel`` confirms the job left the queue; (d) a
preemption/time-limit signal stops every rank at a step boundary with a checkpoint, and the next
attempt resumes from it with no step lost; (e) a bad partition or time format is refused
before anything is queued. Timings print with ``-s``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from orch_helpers import job_processes, orch, progress, status, wait_for, write_config


def _cluster_problem() -> str | None:
    if not os.environ.get("SLURM_CONF"):
        return "SLURM_CONF is not set: start the lab with `bash scripts/slurm-lab.sh start` and export SLURM_CONF"
    if shutil.which("sinfo") is None:
        return "SLURM client tools are not installed (`bash scripts/slurm-lab.sh install`)"
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"the SLURM cluster of SLURM_CONF is not reachable: {r.stderr.strip()}"
    return None


_PROBLEM = _cluster_problem()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")]

LAB = {"backend": "slurm", "slurm": {"profile": "local-lab"}}
TWO_NODES = {"backend": "slurm", "nproc_per_node": 1, "slurm": {"profile": "local-lab", "nodes": 2, "cpus_per_task": 1}}
TIMINGS: dict[str, float] = {}


def _timing(name: str, seconds: float) -> None:
    TIMINGS[name] = round(seconds, 2)
    print(f"\nTIMING {name}: {seconds:.1f} s")
    out = os.environ.get("SLURM_TIMINGS_FILE")
    if out:
        Path(out).write_text(json.dumps(TIMINGS, indent=1))


def _slurm_job(run_dir, attempt: int = 1, timeout: float = 120) -> str:
    path = Path(run_dir) / "attempts" / str(attempt) / "slurm.json"
    return wait_for(lambda: (json.loads(path.read_text()) if path.exists() else {}).get("job_id"), timeout,
                    f"attempt {attempt} to be submitted")


def _queue_state(slurm_job: str) -> str:
    r = subprocess.run(["squeue", "-h", "-t", "all", "-j", slurm_job, "-o", "%T"], capture_output=True, text=True)
    return r.stdout.strip()


def _wait_state(home, job_id, timeout=300) -> dict:
    return wait_for(lambda: (lambda s: s if s["state"] in ("COMPLETED", "FAILED", "CANCELLED") else None)(
        status(home, job_id)), timeout, f"job {job_id} to end", interval=1.0)


def _logs(run_dir, attempt=None) -> list[dict]:
    return [r for r in progress(run_dir) if r["event"] == "log" and (attempt is None or r["attempt"] == attempt)]


def _submit_detached(home, tmp_path, cfg) -> tuple[str, str]:
    r = orch(home, "submit", "--detach", str(cfg), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = r.stdout.strip()
    return job_id, status(home, job_id)["run_dir"]


def test_a_demo_completes_through_slurm(tmp_path, demo_assets):
    home = tmp_path / "we ird 'home' $(touch pwned)"      # every path in the sbatch script is quoted
    cfg = write_config(tmp_path, demo_assets, name="demo", launch=LAB, max_steps=12, save_steps=4, logging_steps=2)
    t0 = time.time()
    r = orch(home, "submit", str(cfg), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    job = status(home, json.loads(orch(home, "list", "--json").stdout)[0]["id"])
    assert job["state"] == "COMPLETED" and job["step"] == job["max_steps"] == 12
    assert job["distributed_type"] == "FSDP" and job["world_size"] == 2
    assert [a["failure"] for a in job["attempts"]] == ["COMPLETED"]
    run = Path(job["run_dir"])
    record = json.loads((run / "attempts/1/slurm.json").read_text())
    assert record["state"] == "COMPLETED" and _queue_state(record["job_id"]) == "COMPLETED"
    ranks = sorted(p.parent.name for p in run.glob("attempts/1/ranks/node0/**/stdout.log"))
    assert ranks == ["0", "1"], "every rank's output is kept, per node"
    logs = orch(home, "logs", job["id"])
    assert logs.returncode == 0 and "rank 0" in logs.stdout and "rank 1" in logs.stdout
    assert (run / "output/checkpoint-12/.orchestrate-complete").is_file() and not (tmp_path / "pwned").exists()
    first = _logs(run)[0]
    node = json.loads((run / "attempts/1/nodes/0/node.json").read_text())
    _timing("submit -> job running (slurm)", node["started"] - record["submitted"])
    _timing("submit command -> first training step", first["time"] - t0)


def test_b_two_nodes_complete_with_the_right_world_size(tmp_path, demo_assets):
    home = tmp_path / "home"
    cfg = write_config(tmp_path, demo_assets, launch=TWO_NODES, max_steps=8, save_steps=4, logging_steps=2)
    r = orch(home, "submit", str(cfg), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    job = status(home, json.loads(orch(home, "list", "--json").stdout)[0]["id"])
    assert job["state"] == "COMPLETED" and job["world_size"] == 2 and job["distributed_type"] == "FSDP"
    run = Path(job["run_dir"])
    nodes = [json.loads((run / f"attempts/1/nodes/{n}/node.json").read_text()) for n in (0, 1)]
    assert [n["node"] for n in nodes] == [0, 1] and {n["nnodes"] for n in nodes} == {2}
    assert nodes[0]["endpoint"] == nodes[1]["endpoint"]                     # one rendezvous for both nodes
    assert {"--node-rank=0", "--nnodes=2"} <= set(nodes[0]["argv"]) and "--node-rank=1" in nodes[1]["argv"]
    for n in (0, 1):
        assert list(run.glob(f"attempts/1/ranks/node{n}/**/stdout.log")), f"node {n}'s rank log"
    start = next(r for r in progress(run) if r["event"] == "start")
    assert start["world_size"] == 2
    assert (run / "attempts/1/nodes/0/status.json").is_file()              # global rank 0 ran on node 0
    logs = orch(home, "logs", job["id"]).stdout
    assert "[rank 0]" in logs and "[rank 1]" in logs


def _kill_rank(job_id: str, rank: str) -> int:
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if env.get("ORCHESTRATE_JOB_ID") == job_id and env.get("RANK") == rank and \
                    "train_worker" in " ".join(p.cmdline()):
                p.send_signal(signal.SIGKILL)
                return p.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} of {job_id} found")


def test_c_a_killed_rank_is_resumed_from_the_verified_checkpoint(tmp_path, demo_assets):
    home = tmp_path / "home"
    cfg = write_config(tmp_path, demo_assets, launch=TWO_NODES, max_steps=20, save_steps=5, logging_steps=1)
    job_id, run = _submit_detached(home, tmp_path, cfg)
    wait_for(lambda: (Path(run) / "output/checkpoint-5/.orchestrate-complete").exists(), 240, "checkpoint-5")
    _kill_rank(job_id, "1")
    job = _wait_state(home, job_id)
    assert job["state"] == "COMPLETED" and job["step"] == 20
    assert [a["failure"] for a in job["attempts"]] == ["KILLED", "COMPLETED"]
    resumed = job["attempts"][1]["resumed_from"]
    assert resumed and resumed.startswith(str(Path(run) / "output" / "checkpoint-"))
    ckpt = int(resumed.rsplit("-", 1)[1])
    assert min(r["step"] for r in _logs(run, 2)) == ckpt + 1               # nothing before it is redone or lost
    assert json.loads((Path(run) / "attempts/1/slurm.json").read_text())["state"] == "FAILED"


def test_c_scancel_from_outside_is_the_users_cancel(tmp_path, demo_assets):
    home = tmp_path / "home"
    cfg = write_config(tmp_path, demo_assets, launch=LAB, max_steps=400, save_steps=1000, logging_steps=1)
    job_id, run = _submit_detached(home, tmp_path, cfg)
    slurm_job = _slurm_job(run)
    wait_for(lambda: _logs(run), 240, "the first training step")
    subprocess.run(["scancel", slurm_job], check=True)
    job = _wait_state(home, job_id, timeout=120)
    assert job["state"] == "CANCELLED" and [a["failure"] for a in job["attempts"]] == ["CANCELLED"]
    assert _queue_state(slurm_job) == "CANCELLED" and wait_for(lambda: job_processes(job_id) == [], 60, "no process")


def test_c_orchestrate_cancel_runs_scancel_and_confirms(tmp_path, demo_assets):
    home = tmp_path / "home"
    cfg = write_config(tmp_path, demo_assets, launch=LAB, max_steps=400, save_steps=1000, logging_steps=1)
    job_id, run = _submit_detached(home, tmp_path, cfg)
    slurm_job = _slurm_job(run)
    wait_for(lambda: _logs(run), 240, "the first training step")
    r = orch(home, "cancel", job_id, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert status(home, job_id)["state"] == "CANCELLED"
    assert _queue_state(slurm_job) == "CANCELLED" and job_processes(job_id) == []


def test_d_preemption_signal_checkpoints_and_the_next_attempt_resumes(tmp_path, demo_assets):
    home = tmp_path / "home"
    cfg = write_config(tmp_path, demo_assets, launch=LAB, max_steps=16, save_steps=1000, logging_steps=1)
    job_id, run = _submit_detached(home, tmp_path, cfg)
    slurm_job = _slurm_job(run)
    wait_for(lambda: len(_logs(run)) >= 2, 240, "two training steps")
    t_signal = time.time()
    # What SLURM does before the time limit (--signal=USR2@90) or on preemption: USR2 to every process.
    subprocess.run(["scancel", "--signal=USR2", slurm_job], check=True)
    job = _wait_state(home, job_id)
    assert job["state"] == "COMPLETED" and job["step"] == 16
    assert [a["failure"] for a in job["attempts"]] == ["PREEMPTED", "COMPLETED"]
    recs = progress(run)
    stop = next(r for r in recs if r["event"] == "end" and r["attempt"] == 1)
    assert stop["state"] == "stopped"
    ckpt = Path(run) / "output" / f"checkpoint-{stop['step']}"
    assert (ckpt / ".orchestrate-complete").is_file()                      # written by every rank, verified
    assert job["attempts"][1]["resumed_from"] == str(ckpt)
    assert max(r["step"] for r in _logs(run, 1)) == stop["step"]           # every step done is in the checkpoint
    assert min(r["step"] for r in _logs(run, 2)) == stop["step"] + 1       # and none is lost or redone
    node = json.loads((Path(run) / "attempts/1/nodes/0/node.json").read_text())
    assert [s["signal"] for s in node["signals"]] == ["SIGUSR2"] and node["exit_code"] == 75
    second = json.loads((Path(run) / "attempts/2/slurm.json").read_text())
    node2 = json.loads((Path(run) / "attempts/2/nodes/0/node.json").read_text())
    for what, t in [("checkpoint written", next(r["time"] for r in recs if r["event"] == "checkpoint")),
                    ("attempt 1 left the queue", node["ended"]),
                    ("attempt 2 submitted", second["submitted"]), ("attempt 2 running", node2["started"]),
                    ("first step of the resumed attempt", _logs(run, 2)[0]["time"])]:
        _timing(f"preemption signal -> {what}", t - t_signal)


@pytest.mark.parametrize("slurm, problem", [
    ({"profile": "local-lab", "partition": "no-such-partition"},
     "launch.slurm.partition: SLURM refuses the job: sbatch: error: invalid partition specified: no-such-partition"),
    ({"profile": "local-lab", "time": "1h"},
     "launch.slurm.time: expected MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (or whole minutes), got '1h'"),
])
def test_e_bad_settings_are_refused_before_anything_is_queued(tmp_path, demo_assets, slurm, problem):
    home = tmp_path / "home"
    name = f"refused-{os.getpid()}-{len(problem)}"
    cfg = write_config(tmp_path, demo_assets, launch={"backend": "slurm", "name": name, "slurm": slurm})
    r = orch(home, "submit", str(cfg), cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and problem in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert json.loads(orch(home, "list", "--json").stdout or "[]") == []
    queued = subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i"], capture_output=True, text=True)
    assert queued.stdout.strip() == ""


def test_e_a_broken_job_environment_fails_once_with_its_log(tmp_path, demo_assets):
    home = tmp_path / "home"
    slurm = {"profile": "local-lab", "setup": ["echo 'no such module: cuda/99' >&2", "exit 3"]}
    cfg = write_config(tmp_path, demo_assets, launch={"backend": "slurm", "slurm": slurm})
    r = orch(home, "submit", str(cfg), cwd=tmp_path, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    job = status(home, json.loads(orch(home, "list", "--json").stdout)[0]["id"])
    assert job["state"] == "FAILED" and [a["failure"] for a in job["attempts"]] == ["USER_ERROR"]
    assert "no such module: cuda/99" in job["attempts"][0]["message"]

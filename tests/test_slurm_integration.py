"""The SLURM backend against a real cluster: the one-host lab of ``scripts/slurm-lab.sh``
(Slurm 22.05, three virtual nodes n1-n3, sacct through slurmdbd), which ``.ci/run`` starts.

The supervisor runs inside the job's allocation and every attempt is a job step of it:
(a) the demo completes; (b) a 2-node job has world size 2; (c) a rank killed -9 is followed by a
new step in the same SLURM job, also while a competing job waits for the same nodes, and a
``scancel`` from outside is the user's cancel; (d) a preemption signal checkpoints and the job goes
on in place, while the time limit's signal checkpoints and requeues it into a new allocation (one
job in our ledger); (e) a node set DOWN mid-run: the job goes on without it; (f) the login side
killed right after submit changes nothing, and another login node's index shows the job; plus
settings SLURM refuses before anything is queued. Timings print with ``-s``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from orch_helpers import job_processes, orch, progress, start_orch, status, wait_for, write_config

from orchestrator.plan.slurm import rendezvous_port


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
FAST = {"retry": {"backoff_s": 0.5}}
TIMINGS: dict[str, float] = {}


def _timing(name: str, seconds: float) -> None:
    TIMINGS[name] = round(seconds, 2)
    print(f"\nTIMING {name}: {seconds:.1f} s")
    out = os.environ.get("SLURM_TIMINGS_FILE")
    if out:
        Path(out).write_text(json.dumps(TIMINGS, indent=1))


def _slurm_job(home, job_id, timeout: float = 120) -> str:
    return wait_for(lambda: status(home, job_id).get("scheduler_job_id"), timeout, "the job's allocation")


def _sacct(slurm_job: str, fields: str = "State,Start,End") -> list[str]:
    r = subprocess.run(["sacct", "-n", "-P", "-X", "-j", slurm_job, "-o", fields], capture_output=True, text=True)
    return r.stdout.strip().splitlines()[-1].split("|") if r.stdout.strip() else []


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


def _allocations(run_dir) -> list[dict]:
    return [r for r in progress_file(Path(run_dir) / "slurm" / "allocations.jsonl")]


def progress_file(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def test_a_demo_completes_with_its_supervisor_inside_the_allocation(tmp_path, demo_assets):
    home = tmp_path / "we ird 'home' $(touch pwned)"      # every path in the sbatch script is quoted
    cfg = write_config(tmp_path, demo_assets, name="demo", launch=LAB, max_steps=12, save_steps=4, logging_steps=2)
    t0 = time.time()
    r = orch(home, "submit", str(cfg), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    job = status(home, json.loads(orch(home, "list", "--json").stdout)[0]["id"])
    assert job["state"] == "COMPLETED" and job["step"] == job["max_steps"] == 12
    assert job["distributed_type"] == "FSDP" and job["world_size"] == 2
    [attempt] = job["attempts"]
    assert attempt["failure"] == "COMPLETED" and attempt["scheduler_job_id"] == job["scheduler_job_id"]
    assert attempt["external_id"] == f"{job['scheduler_job_id']}.0" and attempt["nodes"] == "n1"
    run = Path(job["run_dir"])
    assert _queue_state(job["scheduler_job_id"]) == "COMPLETED"
    log = next(run.glob("slurm/*_0_log.out")).read_text()
    assert "supervising" in log and "job COMPLETED" in log                # the supervisor ran in the batch step
    ranks = sorted(p.parent.name for p in run.glob("attempts/1/ranks/node0/**/stdout.log"))
    assert ranks == ["0", "1"], "every rank's output is kept, per node"
    logs = orch(home, "logs", job["id"])
    assert logs.returncode == 0 and "rank 0" in logs.stdout and "rank 1" in logs.stdout
    assert (run / "output/checkpoint-12/.orchestrate-complete").is_file() and not (tmp_path / "pwned").exists()
    submitted, started = _allocations(run)[:2]
    _timing("submit -> allocation running (idle queue)", started["time"] - submitted["time"])
    _timing("submit command -> first training step", _logs(run)[0]["time"] - t0)


def test_b_two_nodes_complete_with_the_right_world_size(tmp_path, demo_assets):
    home = tmp_path / "home"
    cfg = write_config(tmp_path, demo_assets, launch=TWO_NODES, max_steps=8, save_steps=4, logging_steps=2)
    r = orch(home, "submit", str(cfg), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    job = status(home, json.loads(orch(home, "list", "--json").stdout)[0]["id"])
    assert job["state"] == "COMPLETED" and job["world_size"] == 2 and job["distributed_type"] == "FSDP"
    assert job["attempts"][0]["world_size"] == 2 and len(job["attempts"][0]["nodes"].split(",")) == 2
    run = Path(job["run_dir"])
    nodes = [json.loads((run / f"attempts/1/nodes/{n}/node.json").read_text()) for n in (0, 1)]
    assert [n["node"] for n in nodes] == [0, 1] and {n["nnodes"] for n in nodes} == {2}
    assert nodes[0]["endpoint"] == nodes[1]["endpoint"]                     # one rendezvous for both nodes
    assert {"--node-rank=0", "--nnodes=2"} <= set(nodes[0]["argv"]) and "--node-rank=1" in nodes[1]["argv"]
    for n in (0, 1):
        assert list(run.glob(f"attempts/1/ranks/node{n}/**/stdout.log")), f"node {n}'s rank log"
    assert (run / "attempts/1/nodes/0/status.json").is_file()              # global rank 0 ran on node 0
    logs = orch(home, "logs", job["id"]).stdout
    assert "[rank 0]" in logs and "[rank 1]" in logs


def _kill_rank(job_id: str, rank: str) -> float:
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if env.get("ORCHESTRATE_JOB_ID") == job_id and env.get("RANK") == rank and \
                    "train_worker" in " ".join(p.cmdline()):
                t = time.time()
                p.send_signal(signal.SIGKILL)
                return t
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} of {job_id} found")


def test_c_a_killed_rank_restarts_in_place_before_a_waiting_job_gets_the_nodes(tmp_path, demo_assets):
    home = tmp_path / "home"
    cfg = write_config(tmp_path, demo_assets, launch={**TWO_NODES, **FAST}, max_steps=20, save_steps=5,
                       logging_steps=1)
    job_id, run = _submit_detached(home, tmp_path, cfg)
    slurm_job = _slurm_job(home, job_id)
    wait_for(lambda: (Path(run) / "output/checkpoint-5/.orchestrate-complete").exists(), 240, "checkpoint-5")
    nodes = status(home, job_id)["attempts"][0]["nodes"]
    # A competitor for the same nodes, queued behind us: it must not get them when our rank crashes.
    rival = subprocess.run(["sbatch", "--parsable", "-N2", "--exclusive", f"--nodelist={nodes}", "-t", "5",
                            f"--output={tmp_path}/rival-%j.out",
                            "--wrap", "sleep 1"], capture_output=True, text=True, check=True).stdout.strip()
    try:
        wait_for(lambda: _queue_state(rival) == "PENDING", 30, "the competing job to wait")
        t_kill = _kill_rank(job_id, "1")
        job = _wait_state(home, job_id)
        assert job["state"] == "COMPLETED" and job["step"] == 20
        first, second = job["attempts"]
        assert (first["failure"], second["failure"]) == ("KILLED", "COMPLETED")
        assert second["scheduler_job_id"] == first["scheduler_job_id"] == slurm_job and second["in_place"] == 1
        assert second["external_id"] != first["external_id"]                 # a new step, not a new job
        ckpt = int(second["resumed_from"].rsplit("-", 1)[1])
        assert min(r["step"] for r in _logs(run, 2)) == ckpt + 1             # nothing before it is redone or lost
        _timing("rank killed -> next training step (in place)", _logs(run, 2)[0]["time"] - t_kill)
        known = lambda f, i: f[i] if f and f[i] not in ("", "Unknown", "None") else None   # noqa: E731
        # sacct records an end a moment after the allocation ends (slurmdbd): wait for both times to be known
        end_ours = wait_for(lambda: known(_sacct(slurm_job), 2), 60, "our allocation's end in sacct")
        start_rival = wait_for(lambda: known(_sacct(rival), 1), 60, "the competing job to start")
        assert start_rival >= end_ours, (start_rival, end_ours)             # we finished first (ISO times sort)
    finally:
        subprocess.run(["scancel", rival])


def test_c_scancel_from_outside_is_the_users_cancel(tmp_path, demo_assets):
    home = tmp_path / "home"
    cfg = write_config(tmp_path, demo_assets, launch=LAB, max_steps=400, save_steps=1000, logging_steps=1)
    job_id, run = _submit_detached(home, tmp_path, cfg)
    slurm_job = _slurm_job(home, job_id)
    wait_for(lambda: _logs(run), 240, "the first training step")
    subprocess.run(["scancel", slurm_job], check=True)
    job = _wait_state(home, job_id, timeout=120)
    assert job["state"] == "CANCELLED" and [a["failure"] for a in job["attempts"]] == ["CANCELLED"]
    assert _queue_state(slurm_job) == "CANCELLED" and wait_for(lambda: job_processes(job_id) == [], 60, "no process")


def _hold_hashed_ports(tmp_path, ahead: int = 4) -> tuple[list[socket.socket], dict[str, int]]:
    """Listen on the rendezvous port the next few SLURM job ids hash to (attempt 1), as another job's store
    would: ``(sockets, {job id: port held})``. The next id is read from a held job submitted and cancelled."""
    probe = subprocess.run(["sbatch", "--parsable", "--hold", "-t", "1", f"--output={tmp_path}/probe-%j.out",
                            "--wrap", "true"], capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["scancel", probe])
    held, socks = {}, []
    for n in range(int(probe) + 1, int(probe) + 1 + ahead):
        s = socket.socket()
        try:
            s.bind(("", rendezvous_port(str(n), 1)))
            s.listen()
            socks.append(s)
            held[str(n)] = rendezvous_port(str(n), 1)
        except OSError:
            s.close()
    return socks, held


def test_c_orchestrate_cancel_asks_the_supervisor_in_the_allocation(tmp_path, demo_assets):
    home = tmp_path / "home"
    cfg = write_config(tmp_path, demo_assets, launch=LAB, max_steps=400, save_steps=1000, logging_steps=1)
    socks, held = _hold_hashed_ports(tmp_path)   # issue 17: another job's store listens on our hashed port
    try:
        job_id, run = _submit_detached(home, tmp_path, cfg)
        slurm_job = _slurm_job(home, job_id)
        wait_for(lambda: _logs(run), 240, "the first training step")
        endpoint = json.loads((Path(run) / "attempts/1/nodes/0/rendezvous.json").read_text())["endpoint"]
        if slurm_job in held:
            assert not endpoint.endswith(f":{held[slurm_job]}"), "the step reserved another free port"
        else:
            print(f"\nSLURM job {slurm_job} got an id outside {sorted(held)}: the port check had nothing to prove")
    finally:
        for s in socks:
            s.close()
    r = orch(home, "cancel", job_id, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert status(home, job_id)["state"] == "CANCELLED"
    wait_for(lambda: _queue_state(slurm_job) in ("COMPLETED", "CANCELLED"), 60, "the allocation to end")
    assert wait_for(lambda: job_processes(job_id) == [], 60, "no process")


def test_c_cancel_of_a_job_waiting_in_the_queue_scancels_it(tmp_path, demo_assets):
    home = tmp_path / "home"
    blocker = subprocess.run(["sbatch", "--parsable", "-N3", "--exclusive", "-t", "5", f"--output={tmp_path}/blocker-%j.out",
                              "--wrap", "sleep 300"],
                             capture_output=True, text=True, check=True).stdout.strip()
    try:
        wait_for(lambda: _queue_state(blocker) == "RUNNING", 30, "every node to be taken")
        cfg = write_config(tmp_path, demo_assets, launch=LAB)
        r = orch(home, "submit", "--detach", str(cfg), cwd=tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr
        job_id = r.stdout.strip()
        slurm_job = _slurm_job(home, job_id)
        assert _queue_state(slurm_job) == "PENDING"
        st = orch(home, "status", job_id)
        assert "inside its SLURM allocation, when it runs" in st.stdout and "GONE" not in st.stdout
        assert "supervisor is gone" not in st.stderr
        r = orch(home, "cancel", job_id, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert status(home, job_id)["state"] == "CANCELLED" and _queue_state(slurm_job) == "CANCELLED"
    finally:
        subprocess.run(["scancel", blocker])


def test_d_a_preemption_signal_checkpoints_and_the_job_goes_on_in_place(tmp_path, demo_assets):
    home = tmp_path / "home"
    cfg = write_config(tmp_path, demo_assets, launch=LAB, max_steps=16, save_steps=1000, logging_steps=1)
    job_id, run = _submit_detached(home, tmp_path, cfg)
    slurm_job = _slurm_job(home, job_id)
    wait_for(lambda: len(_logs(run)) >= 2, 240, "two training steps")
    t_signal = time.time()
    # What SLURM does on preemption (or before the time limit): USR2 to every process of the steps.
    subprocess.run(["scancel", "--signal=USR2", slurm_job], check=True)
    job = _wait_state(home, job_id)
    assert job["state"] == "COMPLETED" and job["step"] == 16
    assert [a["failure"] for a in job["attempts"]] == ["PREEMPTED", "COMPLETED"]
    assert job["attempts"][1]["in_place"] == 1                            # plenty of time left: a new step here
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
    _timing("preemption signal -> first step after (in place)", _logs(run, 2)[0]["time"] - t_signal)


def _set_time_limit(slurm_job: str, minutes: int) -> None:
    subprocess.run(["scontrol", "update", f"JobId={slurm_job}", f"TimeLimit={minutes}"], check=True)


def test_d_the_time_limit_requeues_the_job_into_a_new_allocation(tmp_path, demo_assets):
    # More steps than any machine trains before its 2-minute limit, so the test does not depend on speed:
    # SLURM sends its signal up to a minute early and only to steps running then; if it misses the step,
    # the supervisor sends it itself once the time left is under the signal delay. Once the job is in its
    # new allocation, the limit is raised (as an admin would) so that it completes there.
    home = tmp_path / "home"
    slurm = {"profile": "local-lab", "time": 2, "signal_delay_s": 45}
    cfg = write_config(tmp_path, demo_assets, launch={**LAB, **FAST, "slurm": slurm}, max_steps=640,
                       save_steps=100000, logging_steps=1)
    job_id, run = _submit_detached(home, tmp_path, cfg)
    slurm_job = _slurm_job(home, job_id)
    wait_for(lambda: len([r for r in _allocations(run) if r["event"] == "started"]) >= 2, 300, "a new allocation")
    _set_time_limit(slurm_job, 15)
    job = _wait_state(home, job_id, timeout=600)
    assert job["state"] == "COMPLETED" and job["step"] == 640, job["message"]
    first, second = job["attempts"][:2]
    assert first["failure"] == "PREEMPTED" and job["attempts"][-1]["failure"] == "COMPLETED"
    assert {a["scheduler_job_id"] for a in job["attempts"]} == {slurm_job}   # requeued: the same SLURM job id
    assert second["in_place"] == 0                                          # ... through the queue
    assert len(json.loads(orch(home, "list", "--json").stdout)) == 1         # one job in our ledger
    stop = next(r for r in progress(run) if r["event"] == "end" and r["attempt"] == 1)
    assert stop["state"] == "stopped" and max(r["step"] for r in _logs(run, 1)) == stop["step"]
    assert second["resumed_from"].endswith(f"checkpoint-{stop['step']}")
    assert min(r["step"] for r in _logs(run, 2)) == stop["step"] + 1          # nothing lost, nothing redone
    _timing("time-limit stop -> first step in the new allocation", _logs(run, 2)[0]["time"] - stop["time"])


def test_e_a_node_set_down_mid_run_and_the_job_goes_on_without_it(tmp_path, demo_assets):
    home = tmp_path / "home"
    cfg = write_config(tmp_path, demo_assets, launch={**TWO_NODES, **FAST}, max_steps=30, save_steps=5,
                       logging_steps=1)
    job_id, run = _submit_detached(home, tmp_path, cfg)
    wait_for(lambda: (Path(run) / "output/checkpoint-5/.orchestrate-complete").exists(), 240, "checkpoint-5")
    lost = status(home, job_id)["attempts"][0]["nodes"].split(",")[1]
    subprocess.run(["scontrol", "update", f"nodename={lost}", "state=down", "reason=orchestrate-test"], check=True)
    try:
        job = _wait_state(home, job_id, timeout=600)
    finally:
        subprocess.run(["scontrol", "update", f"nodename={lost}", "state=resume"])
    assert job["state"] == "COMPLETED" and job["step"] == 30, job["message"]
    assert lost not in job["attempts"][-1]["nodes"].split(",")
    nodes = json.loads((Path(run) / "slurm/nodes.json").read_text())
    assert nodes.get(lost, 0) >= 1
    moved = [r for r in _allocations(run) if r["event"] == "resubmitted"]   # from inside the job, not the login node
    assert moved and lost in moved[0]["exclude"] and job["scheduler_job_id"] == moved[0]["job_id"]


def test_e_with_min_nodes_the_job_goes_on_in_place_on_fewer_nodes_with_the_same_global_batch(tmp_path, demo_assets):
    home = tmp_path / "home"
    launch = {**TWO_NODES, **FAST, "slurm": {**TWO_NODES["slurm"], "min_nodes": 1}}
    cfg = write_config(tmp_path, demo_assets, launch=launch, max_steps=30, save_steps=5, logging_steps=1)
    job_id, run = _submit_detached(home, tmp_path, cfg)
    slurm_job = _slurm_job(home, job_id)
    wait_for(lambda: (Path(run) / "output/checkpoint-5/.orchestrate-complete").exists(), 240, "checkpoint-5")
    lost = status(home, job_id)["attempts"][0]["nodes"].split(",")[1]
    subprocess.run(["scontrol", "update", f"nodename={lost}", "state=down", "reason=orchestrate-test"], check=True)
    try:
        job = _wait_state(home, job_id, timeout=600)
    finally:
        subprocess.run(["scontrol", "update", f"nodename={lost}", "state=resume"])
    assert job["state"] == "COMPLETED" and job["step"] == 30, job["message"]
    last = job["attempts"][-1]
    assert last["world_size"] == 1 and last["nodes"] and lost not in last["nodes"].split(",")
    assert last["scheduler_job_id"] == slurm_job and last["in_place"] == 1       # no trip through the queue
    plan = json.loads((Path(run) / "plan.json").read_text())
    wc = plan["worker_config"]
    assert (plan["nnodes"], wc["gradient_accumulation_steps"], wc["per_device_train_batch_size"]) == (1, 2, 8)
    starts = [r for r in progress(run) if r["event"] == "start"]
    assert {r["global_batch"] for r in starts} == {16} and starts[-1]["world_size"] == 1


def test_f_killing_the_login_side_changes_nothing_and_another_login_node_sees_the_job(tmp_path, demo_assets):
    home = tmp_path / "home"
    cfg = write_config(tmp_path, demo_assets, launch=LAB, max_steps=12, save_steps=4, logging_steps=1)
    proc = start_orch(home, "submit", str(cfg), cwd=tmp_path)
    job_id = wait_for(lambda: (json.loads(orch(home, "list", "--json").stdout or "[]") or [{}])[0].get("id"), 60,
                      "the job in the ledger")
    _slurm_job(home, job_id)
    proc.kill()                                  # kill -9 of everything orchestrate ran on the login node
    proc.wait()
    job = _wait_state(home, job_id)
    assert job["state"] == "COMPLETED" and [a["failure"] for a in job["attempts"]] == ["COMPLETED"]
    other = {"ORCHESTRATE_INDEX": str(tmp_path / "login2" / "index.db")}   # its own index, the same run dirs
    listed = json.loads(orch(home, "list", "--json", env_extra=other).stdout)
    assert [j["id"] for j in listed] == [job_id] and (tmp_path / "login2" / "index.db").is_file()
    st = orch(home, "status", job_id[:10], "--json", env_extra=other)
    assert st.returncode == 0 and json.loads(st.stdout)["state"] == "COMPLETED"


@pytest.mark.parametrize("slurm, problem", [
    ({"profile": "local-lab", "partition": "no-such-partition"},
     "launch.slurm.partition: SLURM refuses the job: sbatch: error: invalid partition specified: no-such-partition"),
    ({"profile": "local-lab", "time": "1h"},
     "launch.slurm.time: expected MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (or whole minutes), got '1h'"),
])
def test_g_bad_settings_are_refused_before_anything_is_queued(tmp_path, demo_assets, slurm, problem):
    home = tmp_path / "home"
    name = f"refused-{os.getpid()}-{len(problem)}"
    cfg = write_config(tmp_path, demo_assets, launch={"backend": "slurm", "name": name, "slurm": slurm})
    r = orch(home, "submit", str(cfg), cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and problem in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert json.loads(orch(home, "list", "--json").stdout or "[]") == []
    queued = subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i"], capture_output=True, text=True)
    assert queued.stdout.strip() == ""


def test_g_a_broken_job_environment_fails_once_with_its_log(tmp_path, demo_assets):
    home = tmp_path / "home"
    slurm = {"profile": "local-lab", "setup": ["echo 'no such module: cuda/99' >&2", "exit 3"]}
    cfg = write_config(tmp_path, demo_assets, launch={"backend": "slurm", "slurm": slurm})
    r = orch(home, "submit", str(cfg), cwd=tmp_path, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    job = status(home, json.loads(orch(home, "list", "--json").stdout)[0]["id"])
    assert job["state"] == "FAILED" and job["attempts"] == []
    assert "no supervisor in it" in job["message"] and "no such module: cuda/99" in job["message"]

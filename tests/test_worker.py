"""The training worker (train_worker.py) and its helpers.

Unit tests run without torchrun. The ``integration`` ones launch real
``torchrun --nproc_per_node=2`` on CPU, FSDP2 over gloo, on the demo assets, and wait on
files (progress lines, status.json), never on fixed sleeps.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.demo import DATA_DIR, MARKER, MODEL_DIR, TRAIN_FILE, is_complete, prepare_demo
from orchestrator.worker import channel
from orchestrator.worker import checkpoints as wck
from orchestrator.worker import support as ws

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "train_worker.py"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
MAX_STEPS, SAVE_STEPS, LOGGING_STEPS = 12, 4, 2


# ---- helpers --------------------------------------------------------------------------------

def wait_for(predicate, timeout: float = 120.0, what: str = "condition", proc=None):
    """Poll ``predicate`` until truthy; fail early if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            value = predicate()
            if value:
                return value
            pytest.fail(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def records(run_dir: Path, event: str | None = None) -> list[dict]:
    recs = channel.read_progress(run_dir / channel.PROGRESS_FILE)
    return [r for r in recs if event is None or r["event"] == event]


def launch(tmp: Path, demo: Path, attempt: int = 1, extra_args=(), env_extra=None, output_dir=None):
    """Start the worker under torchrun like the seed; returns (Popen, run_dir, attempt_dir, output_dir)."""
    run_dir = tmp / "run"
    attempt_dir = run_dir / "attempts" / str(attempt)
    out = output_dir or run_dir / "output"
    worker_config = tmp / "worker.yaml"  # demo.yaml minus launch:, which only orchestrate reads
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    cfg.pop("launch", None)
    worker_config.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATE_")}
    env.update({
        "ACCELERATE_USE_FSDP": "1", "FSDP_CPU_RAM_EFFICIENT_LOADING": "1",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_CACHE": str(tmp / "hf-datasets-cache"),
        channel.ENV_RUN_DIR: str(run_dir), channel.ENV_ATTEMPT_DIR: str(attempt_dir),
        channel.ENV_ATTEMPT: str(attempt), **(env_extra or {}),
    })
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(WORKER),
            "--config", str(worker_config),
            "--model_id", str(demo / MODEL_DIR), "--dataset_path", str(demo / DATA_DIR),
            "--output_dir", str(out), "--use_cpu", "true",
            "--max_steps", str(MAX_STEPS), "--save_steps", str(SAVE_STEPS), "--logging_steps", str(LOGGING_STEPS),
            *extra_args]
    attempt_dir.mkdir(parents=True, exist_ok=True)
    log = open(attempt_dir / "torchrun.log", "w")
    proc = subprocess.Popen(argv, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, run_dir, attempt_dir, out


def finish(proc, attempt_dir: Path, timeout: float = 150) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("torchrun did not finish; log tail:\n" + (attempt_dir / "torchrun.log").read_text()[-3000:])


def log_tail(attempt_dir: Path) -> str:
    return (attempt_dir / "torchrun.log").read_text()[-4000:]


def worker_ranks(agent_pid: int) -> dict[int, int]:
    """``{rank: pid}`` of the torchrun agent's worker processes."""
    import psutil

    return {int(p.environ()["RANK"]): p.pid for p in psutil.Process(agent_pid).children()}


# ---- unit tests -----------------------------------------------------------------------------

def test_demo_assets_are_complete_and_prepare_is_idempotent(demo_assets):
    assert is_complete(demo_assets)
    marker_mtime = (demo_assets / MARKER).stat().st_mtime_ns
    t = time.monotonic()
    assert prepare_demo(demo_assets) == demo_assets
    assert time.monotonic() - t < 1.0 and (demo_assets / MARKER).stat().st_mtime_ns == marker_mtime
    assert (demo_assets / MODEL_DIR / "model.safetensors").is_file()
    assert "<|assistant|>" in (demo_assets / MODEL_DIR / "chat_template.jinja").read_text()
    rows = [json.loads(line) for line in (demo_assets / DATA_DIR / TRAIN_FILE).read_text().splitlines()]
    assert len(rows) >= 200 and all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
                                    for r in rows)


def test_importing_demo_does_not_import_torch():
    code = "import sys, orchestrator.demo; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def _checkpoint(out: Path, step: int, marked=True, state=True) -> Path:
    ck = out / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "optimizer.bin").write_bytes(b"x" * 10)
    if state:
        state_json = {"global_step": step, "log_history": [{"num_tokens": 100 * step}]}
        (ck / wck.TRAINER_STATE).write_text(json.dumps(state_json))
    if marked:
        wck.write_checkpoint_marker(ck, step, tokens=1000 * step)
    return ck


def test_resume_precedence_and_complete_checkpoints(tmp_path):
    out = tmp_path / "out"
    assert ws.resolve_resume(out, None, environ={}) == (None, "no checkpoint")
    c4 = _checkpoint(out, 4)
    c8 = _checkpoint(out, 8)
    _checkpoint(out, 12, marked=False)  # killed mid-save: never picked
    assert ws.resolve_resume(out, None, environ={})[0] == str(c8)
    (c8 / "optimizer.bin").write_bytes(b"short")  # size no longer matches the marker
    assert not wck.is_complete_checkpoint(c8)
    assert ws.resolve_resume(out, None, environ={})[0] == str(c4)
    assert ws.resolve_resume(out, str(c8), environ={})[0] == str(c8)  # the config's explicit choice
    env = {channel.ENV_RESUME_FROM: "none"}
    assert ws.resolve_resume(out, str(c8), environ=env)[0] is None  # the orchestrator's word wins
    assert ws.resolve_resume(out, None, environ={channel.ENV_RESUME_FROM: str(c4)})[0] == str(c4)
    with pytest.raises(FileNotFoundError):
        ws.resolve_resume(out, None, environ={channel.ENV_RESUME_FROM: str(out / "checkpoint-99")})
    assert wck.tokens_at_checkpoint(c4) == 4000  # from the marker, not TRL's restarted count


def test_unmarked_checkpoints_by_hand_need_trainer_state(tmp_path):
    out = tmp_path / "out"
    c2 = _checkpoint(out, 2, marked=False)
    assert ws.resolve_resume(out, None, environ={})[0] == str(c2)
    assert wck.tokens_at_checkpoint(c2) == 200  # falls back to the logged num_tokens
    _checkpoint(out, 3, marked=False, state=False)  # get_last_checkpoint would pick this one and crash
    assert ws.resolve_resume(out, None, environ={})[0] is None


def test_fault_spec():
    assert ws.parse_fault(None, 1) is None
    assert ws.parse_fault("crash:1:3", 1) == ("crash", 1, 3)
    assert ws.parse_fault("crash:1:3", 2) is None  # once per job
    assert ws.parse_fault("hang:0:5:always", 2) == ("hang", 0, 5)
    with pytest.raises(ValueError):
        ws.parse_fault("explode:0:1", 1)
    with pytest.raises(RuntimeError, match="injected fault"):
        ws.maybe_inject_fault(("crash", 0, 3), rank=0, step=3)
    ws.maybe_inject_fault(("crash", 0, 3), rank=1, step=3)  # other rank: nothing


def test_fsdp1_on_cpu_is_refused_up_front():
    from orchestrator.worker.cpu_fsdp import check_cpu_fsdp_args

    check_cpu_fsdp_args(None)
    check_cpu_fsdp_args({"fsdp_version": 2})
    with pytest.raises(ValueError, match="FSDP1"):
        check_cpu_fsdp_args({"fsdp_version": 1})


def test_stop_flag_records_first_signal():
    flag = ws.StopFlag()
    old = {s: signal.getsignal(s) for s in ws.STOP_SIGNALS}
    try:
        flag.install()
        assert not flag
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: flag, timeout=5, what="signal") and flag.signal == "SIGUSR1"
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---- integration: real torchrun, 2 CPU ranks, FSDP2 -----------------------------------------

@pytest.fixture(scope="module")
def completed_run(demo_assets, tmp_path_factory):
    """One uninterrupted run of 12 steps; the reference for the resume test."""
    tmp = tmp_path_factory.mktemp("completed")
    proc, run_dir, attempt_dir, out = launch(tmp, demo_assets)
    code = finish(proc, attempt_dir)
    return code, run_dir, attempt_dir, out


@pytest.mark.integration
def test_fsdp_run_completes_with_progress_markers_and_model(completed_run):
    code, run_dir, attempt_dir, out = completed_run
    assert code == 0, log_tail(attempt_dir)
    start, = records(run_dir, "start")
    assert start["distributed_type"] == "FSDP" and start["fsdp_version"] == 2 and start["fsdp_wrapped"]
    assert start["world_size"] == 2 and start["max_steps"] == MAX_STEPS and start["resumed_from"] is None
    logs = records(run_dir, "log")
    assert [r["step"] for r in logs] == list(range(LOGGING_STEPS, MAX_STEPS + 1, LOGGING_STEPS))
    assert all(math.isfinite(r["loss"]) and r["tokens"] > 0 and r["wall"] > 0 for r in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert [r["tokens"] for r in logs] == sorted(r["tokens"] for r in logs)
    kinds = [r["event"] for r in records(run_dir)]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.index("log") > 0
    ckpts = [r["path"] for r in records(run_dir, "checkpoint")]
    assert ckpts == [str(out / f"checkpoint-{s}") for s in range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS)]
    for path in ckpts:
        marker = channel.read_json(Path(path) / channel.CHECKPOINT_MARKER)
        assert wck.is_complete_checkpoint(path) and "trainer_state.json" in marker["files"]
    status = channel.read_json(attempt_dir / channel.STATUS_FILE)
    assert status["state"] == "completed" and status["step"] == MAX_STEPS
    assert status["distributed_type"] == "FSDP" and status["fsdp_version"] == 2
    assert status["last_checkpoint"] == ckpts[-1] and status["final_model"] == str(out)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # full weights, loadable as is
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.integration
def test_sigterm_stops_with_checkpoint_then_resume_is_bit_identical(completed_run, demo_assets, tmp_path):
    proc, run_dir, attempt_dir, out = launch(tmp_path, demo_assets)
    wait_for(lambda: records(run_dir, "log"), what="the first log record", proc=proc)
    proc.send_signal(signal.SIGTERM)  # the torchrun agent forwards it to the workers
    finish(proc, attempt_dir)  # torchrun itself exits 1 after a signal, whatever its workers did
    status = channel.read_json(attempt_dir / channel.STATUS_FILE)
    assert status and status["state"] == "stopped", log_tail(attempt_dir)
    stopped_at = status["step"]
    assert 0 < stopped_at < MAX_STEPS and status["signal"] == "SIGTERM" and status["final_model"] is None
    assert status["last_checkpoint"] == str(out / f"checkpoint-{stopped_at}")
    assert wck.is_complete_checkpoint(status["last_checkpoint"])
    end = records(run_dir)[-1]
    assert end["event"] == "end" and end["state"] == "stopped" and end["step"] == stopped_at

    proc, run_dir, attempt_dir2, out = launch(tmp_path, demo_assets, attempt=2)
    assert finish(proc, attempt_dir2) == 0, log_tail(attempt_dir2)
    start = records(run_dir, "start")[-1]
    assert start["attempt"] == 2 and start["step"] == stopped_at and start["resumed_from"] == status["last_checkpoint"]
    assert channel.read_json(attempt_dir2 / channel.STATUS_FILE)["state"] == "completed"
    # tokens count over the whole job, across the resume
    ref_tokens = {r["step"]: r["tokens"] for r in records(completed_run[1], "log")}
    assert {r["step"]: r["tokens"] for r in records(run_dir, "log")} == ref_tokens
    from safetensors.torch import load_file

    ref = load_file(completed_run[3] / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert all((ref[k] == got[k]).all() for k in ref), "resumed weights differ from the uninterrupted run"


@pytest.mark.integration
def test_sigusr1_to_one_rank_stops_every_rank_with_exit_75(demo_assets, tmp_path):
    proc, run_dir, attempt_dir, out = launch(tmp_path, demo_assets)
    wait_for(lambda: records(run_dir, "start"), what="the start record", proc=proc)
    ranks = worker_ranks(proc.pid)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGUSR1)  # rank 1 only (torchrun never forwards USR1); rank 0 must follow
    assert finish(proc, attempt_dir) != 0  # torchrun reports any non-zero worker exit as its own 1
    text = (attempt_dir / "torchrun.log").read_text()
    assert text.count(f"exitcode  : {channel.EXIT_STOPPED}") == 2, text[-3000:]
    status = channel.read_json(attempt_dir / channel.STATUS_FILE)
    assert status["state"] == "stopped" and status["signal"] == "another rank"
    assert wck.is_complete_checkpoint(status["last_checkpoint"])
    assert status["last_checkpoint"].endswith(f"checkpoint-{status['step']}")


@pytest.mark.integration
def test_row_without_messages_is_a_setup_user_error(demo_assets, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    good = (demo_assets / DATA_DIR / TRAIN_FILE).read_text().splitlines()[:3]
    (data / TRAIN_FILE).write_text("\n".join(good + ['{"text": "no chat here"}']) + "\n")
    proc, run_dir, attempt_dir, out = launch(tmp_path, demo_assets, extra_args=["--dataset_path", str(data)])
    assert finish(proc, attempt_dir) != 0
    err = channel.read_json(attempt_dir / channel.error_file_name(0))
    assert err, log_tail(attempt_dir)
    assert err["phase"] == "setup" and err["type"] == "ValueError" and err["rank"] == 0
    assert str(data / TRAIN_FILE) in err["message"] and "line 4: no 'messages'" in err["message"]
    assert channel.read_json(attempt_dir / channel.STATUS_FILE)["state"] == "failed"


def test_save_fault_spec():
    assert ws.SaveFault.parse(None, 1) is None
    f = ws.SaveFault.parse("kill:1:8:rotate", 1)
    assert (f.kind, f.rank, f.step, f.point) == ("kill", 1, 8, "rotate")
    assert ws.SaveFault.parse("kill:1:8:rotate", 2) is None
    assert ws.SaveFault.parse("sleep:0:4:model:30:always", 3).seconds == 30.0
    with pytest.raises(ValueError, match="POINT one of"):
        ws.SaveFault.parse("kill:0:4:somewhere", 1)
    with pytest.raises(OSError) as e:
        ws.SaveFault.parse("enospc:0:4:optimizer", 1).fire(0, 4, "optimizer")
    assert e.value.errno == 28
    ws.SaveFault.parse("enospc:0:4:optimizer", 1).fire(1, 4, "optimizer")   # another rank: nothing

"""Epoch schedules, the best model under background saves, and the worker's fence, with real torchrun
(2 CPU ranks, FSDP2 with sharded checkpoints written in the background; issues 16.3, 16.4, 17.3).

The worker runs as the orchestrator starts it (``train_worker.py`` under torchrun, attempt by attempt),
without the supervisor, so each attempt's fault and resume point are the test's own choice.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.worker import channel
from orchestrator.worker.checkpoints import list_checkpoints, read_marker, verify_checkpoint

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
ROWS = 40          # 40 rows -> 48 with the padding to the global batch of 16: 3 optimizer steps per epoch
EPOCHS = 3
STEPS = 9
BEST_RUN = dict(bf16=True, num_train_epochs=EPOCHS, max_steps=-1, eval_strategy="epoch", save_strategy="epoch",
                logging_steps=1, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                save_total_limit=1, lr_scheduler_type="linear", packing=False)


def _data(tmp: Path, demo: Path) -> Path:
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    rows = (demo / "data" / "train_dataset.json").read_text().splitlines()[:ROWS]
    (data / "train_dataset.json").write_text("\n".join(rows) + "\n")
    (data / "test_dataset.json").write_text((demo / "data" / "test_dataset.json").read_text())
    return data


def _launch(run: Path, attempt: int, demo: Path, data: Path, training: dict, env_extra=None) -> subprocess.Popen:
    """One attempt: the demo config (sharded FSDP2 checkpoints, as the plan writes them) with ``training``."""
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg.pop("launch", None)
    cfg["fsdp_config"]["state_dict_type"] = "SHARDED_STATE_DICT"
    cfg.update(training, model_id=str(demo / "model"), dataset_path=str(data), output_dir=str(run / "output"),
               use_cpu=True)
    attempt_dir = run / "attempts" / str(attempt)
    attempt_dir.mkdir(parents=True)
    (attempt_dir / "worker.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATE_")}
    env.update({"ACCELERATE_USE_FSDP": "1", "FSDP_CPU_RAM_EFFICIENT_LOADING": "1", "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                channel.ENV_RUN_DIR: str(run), channel.ENV_ATTEMPT_DIR: str(attempt_dir),
                channel.ENV_ATTEMPT: str(attempt), **(env_extra or {})})
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(REPO / "train_worker.py"),
            "--config", str(attempt_dir / "worker.yaml")]
    log = open(attempt_dir / "torchrun.log", "w")
    return subprocess.Popen(argv, cwd=run, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, run: Path, attempt: int, timeout: float = 400) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("torchrun did not finish: " + (run / "attempts" / str(attempt) / "torchrun.log").read_text()[-3000:])


def _attempt(run, attempt, demo, data, training, env_extra=None) -> int:
    return _wait(_launch(run, attempt, demo, data, training, env_extra), run, attempt)


def _attempt_killed(run, attempt, demo, data, training, rank: int, step: int, after_checkpoint: int) -> int:
    """An attempt whose ``rank`` is killed with SIGKILL at the start of ``step``, once the checkpoint of step
    ``after_checkpoint`` is committed: the rank is held at that step (the test-only hang), the test waits for
    the checkpoint's record, then kills it (a kill at the step itself could come before a background commit
    on a busy machine)."""
    import psutil

    proc = _launch(run, attempt, demo, data, training, {"ORCHESTRATE_FAULT": f"hang:{rank}:{step}:always"})
    deadline = time.monotonic() + 300
    while not any(r["attempt"] == attempt and r["step"] == after_checkpoint for r in _records(run, "checkpoint")):
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint-%d in attempt %d" % (
            after_checkpoint, attempt)
        time.sleep(0.05)
    ranks = {int(p.environ().get("RANK", -1)): p for p in psutil.Process(proc.pid).children(recursive=True)
             if "train_worker.py" in " ".join(p.cmdline())}
    ranks[rank].send_signal(signal.SIGKILL)
    return _wait(proc, run, attempt)


def _records(run: Path, event: str) -> list[dict]:
    return [r for r in channel.read_progress(run / channel.PROGRESS_FILE) if r["event"] == event]


def _loss_by_step(run: Path) -> dict[int, float]:
    """Each step's loss, from the attempt that trained it last."""
    return {r["step"]: r["loss"] for r in _records(run, "log")}


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _checkpoint_weights(checkpoint: Path, base: Path) -> dict:
    from orchestrator.worker.export import load_checkpoint_weights

    return load_checkpoint_weights(checkpoint, base).state_dict()


def _same(checkpoint: dict, final: dict) -> bool:
    """Every tensor of the final model equals the checkpoint's (tied weights are saved once in the final one)."""
    import torch

    return final.keys() <= checkpoint.keys() and all(torch.equal(checkpoint[k].float(), final[k].float())
                                                     for k in final)


def test_epochs_with_eval_and_the_best_model_survive_kills_at_an_epochs_end_and_mid_epoch(tmp_path, demo_assets):
    """bf16, 3 epochs of 3 steps, eval and a sharded background save at each epoch's end, the best model loaded
    at the end. The reference runs uninterrupted with eval_loss lower-is-better (its best is its last, in-flight
    save: a write slowed by 4 s must be complete before transformers loads it). The faulted run has rank 1
    killed -9 at the start of an epoch's last step (step 6) and rank 0 mid-epoch (step 8), and asks for the
    highest eval loss (epoch 1's checkpoint, which save_total_limit 1 must never rotate away). Both train the
    same steps with the same losses; each final model is its best checkpoint's weights."""
    data = _data(tmp_path, demo_assets)
    ref = tmp_path / "reference"
    code = _attempt(ref, 1, demo_assets, data, {**BEST_RUN, "greater_is_better": False},
                    {"ORCHESTRATE_SAVE_FAULT": f"sleep:0:{STEPS}:write:4"})
    assert code == 0, (ref / "attempts/1/torchrun.log").read_text()[-3000:]

    run = tmp_path / "faulted"
    faulted = {**BEST_RUN, "greater_is_better": True}
    assert _attempt_killed(run, 1, demo_assets, data, faulted, rank=1, step=6, after_checkpoint=3) != 0
    assert _attempt_killed(run, 2, demo_assets, data, faulted, rank=0, step=8, after_checkpoint=6) != 0
    assert _attempt(run, 3, demo_assets, data, faulted) == 0, (run / "attempts/3/torchrun.log").read_text()[-3000:]

    out = run / "output"
    starts = {r["attempt"]: r for r in _records(run, "start")}
    assert starts[2]["resumed_from"] == str(out / "checkpoint-3")     # killed in epoch 2's last step
    assert starts[3]["resumed_from"] == str(out / "checkpoint-6")     # killed mid-epoch 3
    assert starts[1]["max_steps"] == STEPS and starts[1]["num_train_epochs"] == EPOCHS
    assert sorted(_loss_by_step(run)) == list(range(1, STEPS + 1))
    assert _loss_by_step(run) == _loss_by_step(ref), "a resumed epoch trained differently"

    for folder, best_step in ((ref / "output", STEPS), (out, 3)):
        state = json.loads((folder / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
        evals = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
        assert sorted(evals) == [3, 6, 9]
        pick = max if folder == out else min
        assert pick(evals, key=evals.get) == best_step, evals         # the demo model's eval loss falls each epoch
        best = folder / f"checkpoint-{best_step}"
        assert state["best_model_checkpoint"] == str(best) and state["best_global_step"] == best_step
        assert verify_checkpoint(best, best_step).ok and read_marker(best)["format"] == 2
        assert _same(_checkpoint_weights(best, demo_assets / "model"), _weights(folder)), "final model is not the best"
    assert [s for s, _ in list_checkpoints(out)] == [9, 3]            # save_total_limit 1, and the best one
    ckpt = {r["step"]: r for r in _records(ref, "checkpoint")}
    assert ckpt[STEPS]["async_write"] and ckpt[STEPS]["write_s"] >= 4  # loaded only once this write was done
    assert not _same(_weights(ref / "output"), _weights(out))


def test_a_fenced_rank_0_commits_no_checkpoint_and_deletes_nothing(tmp_path, demo_assets):
    """Contract 2: once a newer lease generation exists, the saves of this attempt stay unmarked, the older
    complete checkpoint stays although save_total_limit 1 would rotate it away, and every rank stops."""
    run = tmp_path / "run"
    (run / "lease").mkdir(parents=True)
    (run / "lease" / "00000001.json").write_text("{}")
    training = dict(max_steps=8, save_steps=2, logging_steps=1, save_total_limit=1, packing=False)
    # The save of checkpoint-4 waits 5 s on rank 0 before writing anything: the new owner comes meanwhile.
    proc = _launch(run, 1, demo_assets, demo_assets / "data", training,
                   {channel.ENV_LEASE_GEN: "1", "ORCHESTRATE_SAVE_FAULT": "sleep:0:4:start:5"})
    deadline = time.monotonic() + 300
    while not _records(run, "checkpoint") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert [r["step"] for r in _records(run, "checkpoint")] == [2]
    (run / "lease" / "00000002.json").write_text("{}")
    # every rank stops at the next agreed step boundary, writing nothing more (its end record aside)
    assert _wait(proc, run, 1) != 0                 # torchrun's own code; each rank's is EXIT_STOPPED (below)
    out = run / "output"
    assert [r["step"] for r in _records(run, "checkpoint")] == [2]
    assert [s for s, p in list_checkpoints(out) if read_marker(p)] == [2] and verify_checkpoint(out / "checkpoint-2",
                                                                                                2).ok
    end = _records(run, "end")
    assert len(end) == 1 and end[0]["state"] == channel.WORKER_STOPPED and "lease generation 2" in end[0]["halted"]
    assert end[0]["step"] <= 8 and not (out / "model.safetensors").exists()    # no final model either
    log = (run / "attempts" / "1" / "torchrun.log").read_text()
    assert "lease generation 2 exists and this attempt runs under generation 1" in log
    assert log.count(f"exitcode  : {channel.EXIT_STOPPED} ") == 2 and log.count("without writing anything more") == 2

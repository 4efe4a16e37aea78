"""Issue 19: what a new user stumbled on in the first week, each pinned; and a sweep on screen (the group
table sorted by eval loss from contract-1 eval records, a group as one block in the jobs view)."""
from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from orchestrator.dashboard.groups import group_frame, group_json, in_blocks
from orchestrator.dashboard.live import final_summary
from orchestrator.dashboard.render import Snapshot, detail_frame, jobs_table, snapshot_json, status_frame
from orchestrator.dashboard.report import Series, world_changes
from orchestrator.errors import JobError
from orchestrator.plan import choose_nproc
from orchestrator.plan.topology import Topology
from orchestrator.states import JobState
from orchestrator.store.groups import Group, Point
from orchestrator.store.jobs import resolve_job
from orchestrator.store.ledger import AttemptRecord, Job, Ledger
from orchestrator.store.progress import ProgressFollower, ProgressState
from orchestrator.worker import channel

NOW = 50_000.0
RED = "\x1b[1;31m"


def text_of(renderable, width: int = 200, terminal: bool = False) -> str:
    console = Console(record=True, width=width, force_terminal=terminal, color_system="truecolor" if terminal
                      else None, file=io.StringIO())
    console.print(renderable)
    return console.export_text(styles=terminal)


def job(job_id="demo-0101-aaaaaa", state=JobState.RUNNING, attempts=(), **kw) -> Job:
    fields = dict(id=job_id, name="demo", backend="local", state=state, created=NOW - 300, updated=NOW - 10,
                  run_dir=f"/runs/{job_id}", config_path="/c.yaml", output_dir="/out", step=40, max_steps=40)
    return Job(**{**fields, **kw}, attempts=list(attempts))


def attempt(n, failure=None, start=0, end=None, message=None) -> AttemptRecord:
    return AttemptRecord(job_id="demo-0101-aaaaaa", n=n, started=NOW - 300 + 60 * n, ended=None if failure is None
                         else NOW - 250 + 60 * n, failure=failure, start_step=start, end_step=end, message=message)


def prog(step=40, **kw) -> ProgressState:
    return ProgressState(**{**dict(step=step, max_steps=40, loss=2.5, losses=[(s, 6.0 / s) for s in range(2, 41, 2)]),
                            **kw})


def test_a_failed_row_is_red_and_says_why_first():
    failed = job(state=JobState.FAILED, message="out of memory: retrying unchanged would fail the same way ...",
                 attempts=[attempt(1, "OOM", 0, 40, "rank 0: torch.OutOfMemoryError: CUDA out of memory")])
    plain = text_of(jobs_table([Snapshot(failed, prog(), NOW)]))
    row = next(line for line in plain.splitlines() if "demo-0101-aaaaaa" in line)
    assert row.split("  ")[-1].strip().startswith("OOM: rank 0: torch.OutOfMemoryError: CUDA out of memory · out")
    coloured = text_of(jobs_table([Snapshot(failed, prog(), NOW)]), terminal=True)
    assert coloured.count("31m") >= 4          # id, name, bar, step, state and reason in red: no success look
    budget = job(state=JobState.FAILED, message="CRASHED: restart budget used up (3 restarts)",
                 attempts=[attempt(1, "CRASHED", 0, 5, "rank 1: RuntimeError: boom")])
    assert "CRASHED: rank 1: RuntimeError: boom · restart budget used up" in text_of(
        jobs_table([Snapshot(budget, prog(), NOW)]))
    check = job(state=JobState.FAILED, message="training completed, but the final model's logits differ",
                attempts=[attempt(1, "COMPLETED", 0, 40)])
    assert "final model check: the final model's logits differ" in text_of(jobs_table([Snapshot(check, prog(), NOW)]))


def test_steps_lost_after_the_last_checkpoint_are_not_gains():
    j = job(attempts=[attempt(1, "KILLED", 0, 273), attempt(2, "CRASHED", 200, 250), attempt(3, "COMPLETED", 240, 400)])
    snap = Snapshot(j, prog(), NOW)
    text = text_of(detail_frame(snap))
    rows = [line for line in text.splitlines() if "KILLED" in line or "CRASHED" in line or "COMPLETED" in line]
    assert "200 (73 lost)" in rows[0] and "40 (10 lost)" in rows[1] and "160" in rows[2]
    data = snapshot_json(snap)
    assert [(a["steps_kept"], a["steps_lost"]) for a in data["attempts"]] == [(200, 73), (40, 10), (160, 0)]
    last_failed = Snapshot(job(state=JobState.FAILED, attempts=[attempt(1, "CRASHED", 0, 37)]),
                           prog(last_checkpoint_step=30), NOW)
    assert snapshot_json(last_failed)["attempts"][0]["steps_lost"] == 7


def test_two_jobs_of_one_config_are_told_apart():
    a = Snapshot(job("demo-0101-aaaaaa"), prog(), NOW, overrides=("learning_rate=1e-5",))
    b = Snapshot(job("demo-0101-bbbbbb", created=NOW - 7200), prog(), NOW)
    c = Snapshot(job("demo-0101-cccccc", created=NOW - 3600), prog(), NOW)
    text = text_of(jobs_table([a, b, c]))
    assert "demo learning_rate=1e-5" in text
    stamp = time.strftime("@%H:%M", time.localtime(NOW - 7200))
    assert f"demo {stamp}" in text and time.strftime("@%H:%M", time.localtime(NOW - 3600)) in text


def test_the_summary_after_a_hand_off_does_not_call_a_running_loss_final():
    running = final_summary(Snapshot(job(step=12), prog(12), NOW))
    assert "final loss" not in running and "loss 2.5000" in running and "supervised in the background" in running
    done = final_summary(Snapshot(job(state=JobState.COMPLETED), prog(), NOW))
    assert "final loss 2.5000" in done


def test_the_report_marks_a_change_of_world_size():
    series = [Series(1, start_step=0, world_size=2), Series(2, start_step=50, world_size=2),
              Series(3, start_step=80, world_size=1)]
    assert world_changes(series) == [(80, 2, 1)]


def test_a_short_prefix_lists_every_job_it_matches(tmp_path):
    ledger = Ledger(tmp_path / "index" / "h.db", tmp_path / "runs")
    for k in range(7):
        ledger.create_job(job_id=f"demo-0101-{k:06d}", name="demo", backend="local",
                          run_dir=str(tmp_path / "runs" / f"demo-0101-{k:06d}"), config_path="c", output_dir="o")
    with pytest.raises(JobError) as err:
        resolve_job(ledger, "demo")
    assert "matches 7 jobs" in str(err.value) and "demo-0101-000006" in str(err.value)
    (tmp_path / "groups").mkdir()
    (tmp_path / "groups" / "demo-sweep-0101-abcdef.json").write_text("{}")
    with pytest.raises(JobError) as err:
        resolve_job(ledger, "demo-sweep")
    assert "is a sweep's group, not a job: orchestrate status --group demo-sweep" in str(err.value)


def test_idle_gpus_are_named_and_the_memory_verdict_uses_its_estimate():
    _, _, notices, _ = choose_nproc(2, Topology(8, 64), use_cpu=False)
    assert notices == ["launch.nproc_per_node: 2 of 8 GPUs used, 6 would sit idle (nproc_per_node: auto uses them "
                       "all; a --sweep runs 4 jobs side by side)"]
    assert choose_nproc(8, Topology(8, 64), use_cpu=False)[2] == []
    from orchestrator.config.performance import PerformanceSettings
    from orchestrator.plan.inputs import read_model_shape
    from orchestrator.plan.performance import plan_performance

    training = {"fsdp": True, "fsdp_config": {}, "max_length": 2048, "per_device_train_batch_size": 2}
    record, _, _ = plan_performance(training, PerformanceSettings(), device="cuda", world=8, fsdp=True,
                                    gpu_memory_gib=None, liger_installed=False,
                                    model_shape=read_model_shape("Qwen/Qwen2.5-7B")[0], model_source="built-in")
    verdict = record["memory"]["verdict"]
    assert "no estimate" not in verdict and "GiB peak per GPU" in verdict and "--gpu-memory" in verdict
    ckpt = next(c for c in record["choices"] if c["name"] == "activation_checkpointing")
    assert ckpt["value"] is True and "whether the job fits without it is unknown" in ckpt["why"]


def test_the_default_sharded_checkpoints_are_no_notice(tmp_path):
    from helpers import BASE_YAML, make_demo_workdir, write_config

    from orchestrator.plan.prepare import prepare

    work = make_demo_workdir(tmp_path / "w")
    cfg = write_config(work / "c.yaml", BASE_YAML + "fsdp: true\nlaunch:\n  nproc_per_node: 2\n")
    _, plan = prepare(str(cfg), cwd=str(work), home=tmp_path / "home", topology=Topology(0, 2))
    assert plan.worker_config["fsdp_config"]["state_dict_type"] == "SHARDED_STATE_DICT"
    assert not any("SHARDED_STATE_DICT" in n for n in plan.notices)


# --- a sweep on screen ----------------------------------------------------------------------------------

def _member(job_id, state, created, group="demo-sweep-0101-abcdef", **kw):
    return job(job_id, state=state, created=created, group_id=group, name=job_id.rsplit("-", 2)[0], **kw)


def test_the_group_table_is_sorted_by_best_eval_loss_read_from_eval_records(tmp_path):
    evals = {"a": [2.0, 1.5, 1.7], "b": [1.9, 1.2], "c": []}
    snaps = {}
    for name, losses in evals.items():
        path = tmp_path / f"{name}.jsonl"
        channel.append_jsonl(path, {"event": "log", "attempt": 1, "step": 5, "loss": 3.0, "time": 1.0})
        for k, loss in enumerate(losses):   # contract 1 (TEAM.md): the worker's eval record
            channel.append_jsonl(path, {"event": "eval", "attempt": 1, "time": 2.0 + k, "step": 10 * (k + 1),
                                        "epoch": None, "metrics": {"eval_loss": loss, "eval_runtime": 0.1},
                                        "eval_s": 0.1})
        follower = ProgressFollower(path)
        follower.poll()
        snaps[f"demo-lr-{name}-0101-aaaaaa"] = Snapshot(_member(f"demo-lr-{name}-0101-aaaaaa", JobState.RUNNING,
                                                                NOW), follower.state, NOW)
    group = Group(id="demo-sweep-0101-abcdef", name="demo", created=NOW, config_path="c", backend="local",
                  keys=("learning_rate",), overrides=(), max_parallel=1, parallel_why="--max-parallel 1",
                  ranks_per_job=2, points=tuple(Point(j, {"learning_rate": 1e-5 * (k + 1)}, f"lr-{k}")
                                                for k, j in enumerate(snaps)))
    data = group_json(group, snaps)
    assert [r["job"].split("-")[2] for r in data["jobs"]] == ["b", "a", "c"]
    first = data["jobs"][0]
    assert (first["best_eval_loss"], first["best_eval_step"], first["last_eval_loss"]) == (1.2, 20, 1.2)
    assert (data["jobs"][1]["best_eval_loss"], data["jobs"][1]["last_eval_loss"]) == (1.5, 1.7)
    assert data["jobs"][2]["best_eval_loss"] is None and data["jobs"][0]["keys"] == {"learning_rate": 2e-5}
    text = text_of(group_frame(group, snaps, NOW))
    assert "3 job(s) over learning_rate; 1 at once (--max-parallel 1)" in text
    rows = [line for line in text.splitlines() if "demo-lr-" in line]
    assert "2e-05" in rows[0] and "1.2000 @20" in rows[0] and rows[2].rstrip().endswith("-")


def test_a_group_stands_together_as_one_block_in_the_jobs_view():
    g1 = _member("demo-lr-1-0101-aaaaaa", JobState.COMPLETED, NOW - 100)
    g2 = _member("demo-lr-2-0101-bbbbbb", JobState.QUEUED, NOW - 99)
    other = job("other-0101-cccccc", created=NOW - 50)
    snaps = [Snapshot(j, prog(), NOW) for j in (g2, other, g1)]
    assert [s.job.id for s in in_blocks(snaps)] == ["demo-lr-1-0101-aaaaaa", "demo-lr-2-0101-bbbbbb",
                                                    "other-0101-cccccc"]
    text = text_of(status_frame(snaps, NOW))
    lines = text.splitlines()
    head = next(k for k, line in enumerate(lines) if line.startswith("group demo-sweep-0101-abcdef"))
    assert "2 job(s)" in lines[head] and "orchestrate status --group demo-sweep-0101-abcdef" in lines[head]
    assert "demo-lr-1-0101-aaaaaa" in lines[head + 1] and "demo-lr-2-0101-bbbbbb" in lines[head + 2]
    assert "QUEUED" in lines[head + 2]
    assert sum("group demo-sweep" in line for line in lines) == 1

"""Following progress.jsonl incrementally, the stall rule, and the pure render functions."""
from __future__ import annotations

import json
import math

import pytest
from rich.console import Console

from orchestrator.dashboard.render import Snapshot, fmt_duration, job_detail, jobs_table, sparkline
from orchestrator.states import JobState
from orchestrator.store.ledger import AttemptRecord, Job
from orchestrator.store.progress import ProgressFollower, ProgressState
from orchestrator.supervise.watchdog import StallClock
from orchestrator.worker import channel


def rec(event: str, step: int, attempt: int = 1, **fields) -> dict:
    return {"event": event, "step": step, "attempt": attempt, **fields}


def log(step: int, t: float, loss: float = 1.0, attempt: int = 1, **fields) -> dict:
    return rec("log", step, attempt, time=t, max_steps=40, loss=loss, **fields)


# --- ProgressFollower ------------------------------------------------------------------------------

def test_missing_file_yields_nothing(tmp_path):
    follower = ProgressFollower(tmp_path / "progress.jsonl")
    assert follower.poll() == [] and follower.state == ProgressState()


def test_follower_reads_only_what_was_appended_since_the_last_poll(tmp_path):
    path = tmp_path / "progress.jsonl"
    follower = ProgressFollower(path)
    channel.append_jsonl(path, rec("start", 0, max_steps=40, distributed_type="FSDP", fsdp_version=2, world_size=2))
    channel.append_jsonl(path, log(2, 100.0, loss=2.5))
    assert [r["event"] for r in follower.poll()] == ["start", "log"]
    assert follower.poll() == []
    channel.append_jsonl(path, log(4, 110.0, loss=2.0))
    channel.append_jsonl(path, rec("checkpoint", 4, path="/out/checkpoint-4"))
    assert [r["step"] for r in follower.poll()] == [4, 4]
    s = follower.state
    assert (s.step, s.max_steps, s.loss, s.losses) == (4, 40, 2.0, [(2, 2.5), (4, 2.0)])
    assert (s.distributed_type, s.fsdp_version, s.world_size) == ("FSDP", 2, 2)
    assert (s.last_checkpoint, s.last_checkpoint_step) == ("/out/checkpoint-4", 4)
    assert follower.offset == path.stat().st_size


def test_partial_last_line_waits_until_it_is_complete(tmp_path):
    path = tmp_path / "progress.jsonl"
    follower = ProgressFollower(path)
    line = json.dumps(log(2, 100.0, loss=3.0))
    path.write_text(json.dumps(log(1, 99.0)) + "\n" + line[:10])
    assert [r["step"] for r in follower.poll()] == [1]
    offset = follower.offset
    assert follower.poll() == [] and follower.offset == offset
    with open(path, "a") as f:
        f.write(line[10:])          # complete text, still no newline
    assert follower.poll() == []
    with open(path, "a") as f:
        f.write("\n")
    assert [(r["step"], r["loss"]) for r in follower.poll()] == [(2, 3.0)]


def test_a_garbled_line_is_skipped(tmp_path):
    path = tmp_path / "progress.jsonl"
    path.write_text("not json\n" + json.dumps(log(3, 1.0)) + "\n")
    follower = ProgressFollower(path)
    assert [r["step"] for r in follower.poll()] == [3]


def test_nan_loss_is_read_back(tmp_path):
    path = tmp_path / "progress.jsonl"
    channel.append_jsonl(path, log(2, 1.0, loss=float("nan")))
    follower = ProgressFollower(path)
    follower.poll()
    assert math.isnan(follower.state.loss)


def test_rate_and_eta_come_from_the_latest_attempt(tmp_path):
    path = tmp_path / "progress.jsonl"
    for r in (log(10, 0.0), log(20, 100.0),                 # attempt 1: 0.1 step/s
              log(20, 1000.0, attempt=2), log(30, 1010.0, attempt=2)):   # attempt 2: 1 step/s
        channel.append_jsonl(path, r)
    follower = ProgressFollower(path, attempt=2)
    follower.poll()
    assert follower.state.steps_per_s == pytest.approx(1.0)
    assert follower.state.eta_s() == pytest.approx(10.0)   # 10 steps left of 40
    assert follower.state.attempt_records == 2


def test_no_rate_from_a_single_log():
    s = ProgressState(step=5, max_steps=10, rate_start=(1.0, 5), rate_end=(1.0, 5))
    assert s.steps_per_s is None and s.eta_s() is None


# --- StallClock --------------------------------------------------------------------------------------

def test_stall_clock_startup_threshold():
    clock = StallClock(factor=10, floor_s=300, startup_s=1800, now=1000.0)
    assert clock.limit_s() == 1800
    assert not clock.stalled(2800.0)
    assert clock.stalled(2800.5)


def test_stall_clock_floor_then_median_step_time():
    clock = StallClock(factor=10, floor_s=300, startup_s=1800, now=0.0)
    clock.progressed(50.0)                  # first step: no interval yet -> the floor
    assert clock.limit_s() == 300
    assert not clock.stalled(350.0) and clock.stalled(350.5)
    for t in (110.0, 170.0, 230.0):         # 60 s per step -> 10 x 60 = 600 s
        clock.progressed(t)
    assert clock.limit_s() == 600
    assert not clock.stalled(830.0) and clock.stalled(830.5)


def test_stall_clock_uses_the_median_not_one_slow_step():
    clock = StallClock(factor=2, floor_s=0, startup_s=10, now=0.0)
    for t in (0.0, 1.0, 2.0, 3.0, 103.0):   # intervals 1, 1, 1, 100
        clock.progressed(t)
    assert clock.limit_s() == 2.0


# --- rendering -----------------------------------------------------------------------------------------

NOW = 10_000.0


def make_job(state: JobState = JobState.RUNNING, attempts: int = 2, **kw) -> Job:
    atts = [AttemptRecord(job_id="qwen-0101-abc123", n=n, started=NOW - 500 + 100 * n, ended=None if n == attempts else
                    NOW - 450 + 100 * n, exit_code=None if n == attempts else -9,
                    failure=None if n == attempts else "KILLED", resumed_from=None if n == 1 else
                    "/out/checkpoint-20", start_step=0 if n == 1 else 20, end_step=20 if n < attempts else None)
            for n in range(1, attempts + 1)]
    fields = dict(id="qwen-0101-abc123", name="qwen", backend="local", state=state, created=NOW - 600,
                  updated=NOW - 60, run_dir="/home/u/.orchestrate/runs/qwen-0101-abc123", config_path="/c.yaml",
                  output_dir="/out", step=25, max_steps=40, attempts=atts)
    return Job(**{**fields, **kw})


def progress(**kw) -> ProgressState:
    fields = dict(step=25, max_steps=40, loss=1.2345, tokens_per_s=12345.0, distributed_type="FSDP",
                  fsdp_version=2, world_size=8, last_checkpoint="/out/checkpoint-20", last_checkpoint_step=20,
                  losses=[(5, 3.0), (10, 2.0), (15, 1.5), (20, 1.3), (25, 1.2345)],
                  rate_start=(NOW - 100, 15), rate_end=(NOW, 25))
    return ProgressState(**{**fields, **kw})


def render(renderable) -> str:
    console = Console(record=True, width=140, force_terminal=False)
    console.print(renderable)
    return console.export_text()


def test_jobs_table_shows_id_state_step_and_loss():
    text = render(jobs_table([Snapshot(make_job(), progress(), NOW),
                              Snapshot(make_job(JobState.FAILED, id="old-0101-ffffff", attempts=1),
                                       progress(step=7, loss=None, losses=[]), NOW)]))
    running, failed = (next(line for line in text.splitlines() if job in line)
                       for job in ("qwen-0101-abc123", "old-0101-ffffff"))
    assert "RUNNING" in running and "25/40" in running and "1.2345" in running
    assert "12,345" in running and "step 20" in running
    assert "2:30" in running          # ETA: 15 steps left at 0.1 step/s
    assert "10:00" in running         # elapsed: created 600 s ago
    assert "FAILED" in failed and "7/40" in failed
    assert "9:00" in failed           # elapsed of a finished job stops at its last update


def test_jobs_table_without_progress():
    text = render(jobs_table([Snapshot(make_job(JobState.PENDING, attempts=0, max_steps=None),
                                       ProgressState(), NOW)]))
    line = next(line for line in text.splitlines() if "qwen-0101-abc123" in line)
    assert "PENDING" in line and "0/?" in line


def test_job_detail_shows_summary_and_attempts():
    text = render(job_detail(Snapshot(make_job(message="attempt 2 resumed from checkpoint-20"), progress(), NOW)))
    assert "qwen-0101-abc123 (qwen, local)" in text
    assert "RUNNING" in text
    assert "25/40" in text and "loss 1.2345" in text
    assert "FSDP (FSDP2), world size 8" in text
    assert "/out/checkpoint-20" in text
    assert "attempt 2 resumed from checkpoint-20" in text
    rows = [line for line in text.splitlines() if "KILLED" in line or "running" in line]
    assert len(rows) == 2
    assert "-9" in rows[0] and "20" in rows[0]
    assert "checkpoint-20" in rows[1]


def test_render_does_not_crash_on_a_nan_loss():
    p = progress(loss=float("nan"), losses=[(5, 2.0), (10, float("nan"))])
    assert "nan" in render(jobs_table([Snapshot(make_job(), p, NOW)]))
    assert "nan" in render(job_detail(Snapshot(make_job(), p, NOW)))


@pytest.mark.parametrize("values, want", [
    ([], ""),
    ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], "▁▂▃▄▅▆▇█"),
    ([8.0, 1.0], "█▁"),
    ([2.0, 2.0, 2.0], "▁▁▁"),
    ([1.0, float("nan"), 3.0, float("inf")], "▁!█!"),
    ([float("nan")], "!"),
])
def test_sparkline(values, want):
    assert sparkline(values) == want


def test_sparkline_keeps_the_last_width_values():
    assert sparkline([float(v) for v in range(100)], width=10) == "▁▁▂▃▄▄▅▆▇█"


@pytest.mark.parametrize("seconds, want", [(None, "-"), (0, "0:00"), (59.9, "0:59"), (61, "1:01"),
                                           (3600, "1:00:00"), (3 * 3600 + 62, "3:01:02")])
def test_fmt_duration(seconds, want):
    assert fmt_duration(seconds) == want

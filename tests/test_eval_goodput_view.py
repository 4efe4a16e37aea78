"""Evaluation first-class (issue 16.2) and goodput where people look (issue 20): the worker's records,
the progress reader, and the renderers (detail rows, table cells, --json, loss chart, end summary)."""
from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from orchestrator.dashboard.charts import EVAL_MARK, loss_chart
from orchestrator.dashboard.goodput_view import goodput_text, step_time_text, summary_line
from orchestrator.dashboard.live import final_summary
from orchestrator.dashboard.render import Snapshot, detail_frame, jobs_table, snapshot_json
from orchestrator.dashboard.snapshots import tail_follower
from orchestrator.states import JobState
from orchestrator.store.goodput import AttemptFacts, JobFacts, account
from orchestrator.store.ledger import AttemptRecord, Job
from orchestrator.store.progress import ProgressFollower, ProgressState, apply_eval
from orchestrator.worker.timing import RestoreTimer, StepClock, eval_fields

NOW = 50_000.0


def text_of(renderable, width: int = 160) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def eval_rec(step, loss, attempt=1, **metrics):
    return {"event": "eval", "attempt": attempt, "time": 1000.0 + step, "step": step, "epoch": step / 10,
            "eval_s": 0.5, "metrics": {"eval_loss": loss, "eval_runtime": 0.4, **metrics}}


def write(path, recs):
    with open(path, "a") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


# --- the worker's records ------------------------------------------------------------------------------

def test_eval_fields_keep_every_metric_and_time_the_evaluation_from_its_phase():
    got = eval_fields({"eval_loss": 1.25, "eval_mean_token_accuracy": 0.5, "eval_runtime": 0.3, "epoch": 2.0},
                      2.0, "evaluating", 100.0, 101.75)
    assert got == {"epoch": 2.0, "eval_s": 1.75, "metrics": {"eval_loss": 1.25, "eval_mean_token_accuracy": 0.5,
                                                            "eval_runtime": 0.3, "epoch": 2.0}}
    # outside the evaluating phase (an evaluate() nobody wrapped): the trainer's own runtime
    assert eval_fields({"eval_test_loss": 2.0, "eval_test_runtime": 0.8}, None, "training", 1.0, 9.0)["eval_s"] == 0.8


def test_restore_timer_times_the_trainers_loading_methods_only_on_resume():
    class Trainer:
        def _load_from_checkpoint(self, path):
            return path

        def _load_optimizer_and_scheduler(self, path):
            return None

    t = Trainer()
    timer = RestoreTimer().install(t)
    assert timer.fields(resumed=True) == {}              # nothing loaded yet: no figure rather than a 0
    assert t._load_from_checkpoint("ckpt") == "ckpt"
    t._load_optimizer_and_scheduler("ckpt")
    assert timer.calls == 2 and "restore_s" in timer.fields(resumed=True) and timer.fields(resumed=False) == {}


def test_step_clock_writes_step_and_between_step_times_per_rank(tmp_path):
    # step 1: 0-1 (warm-up, left out); step 2: 1.2-2.2; step 3: 2.9-5.9; written at 6
    times = iter([0.0, 1.0, 1.2, 2.2, 2.9, 5.9, 6.0, 6.0])
    clock = StepClock(tmp_path, rank=3, clock=lambda: next(times))
    clock.WRITE_EVERY_S = 1e9
    for step in (1, 2, 3):
        clock.begin(step)
        clock.end()
    clock.write()
    data = json.loads((tmp_path / "steps-rank3.json").read_text())
    assert data["rank"] == 3 and data["steps"] == 3 and data["first_step"] == 1 and data["time"] == 6.0
    assert data["step_s"]["median"] == pytest.approx(2.0) and data["step_s"]["max"] == pytest.approx(3.0)
    assert data["between_s"]["median"] == pytest.approx(0.45)        # 0.2 and 0.7 s between steps


# --- the progress reader ---------------------------------------------------------------------------------

def test_progress_keeps_the_last_and_best_eval_and_a_redone_step_replaces_its_eval(tmp_path):
    path = tmp_path / "progress.jsonl"
    write(path, [eval_rec(10, 2.0), eval_rec(20, 1.5), eval_rec(30, 1.7)])
    f = ProgressFollower(path)
    f.poll()
    s = f.state
    assert s.last_eval["step"] == 30 and s.last_eval["eval_loss"] == 1.7 and s.last_eval["metrics"]["eval_runtime"]
    assert (s.best_eval["step"], s.best_eval["eval_loss"]) == (20, 1.5) and s.evals == [(10, 2.0), (20, 1.5), (30, 1.7)]
    assert s.best_eval["metrics"]["eval_loss"] == 1.5                     # what the sweep table reads
    write(path, [eval_rec(20, 1.9, attempt=2)])       # rolled back past 20 and evaluated again
    f.poll()
    assert (s.best_eval["step"], s.best_eval["eval_loss"]) == (30, 1.7) and s.evals[-1] == (20, 1.9)
    assert s.best_eval["metrics"]["eval_loss"] == 1.7
    write(path, [eval_rec(40, float("nan"), attempt=2)])
    f.poll()
    assert s.best_eval["step"] == 30 and s.last_eval["step"] == 40


def test_the_tables_tail_reader_finds_an_eval_older_than_the_tail(tmp_path):
    path = tmp_path / "progress.jsonl"
    write(path, [eval_rec(5, 3.25)] + [{"event": "log", "attempt": 1, "step": k, "loss": 1.0, "time": 1000.0 + k}
                                       for k in range(6, 400)])
    follower = tail_follower(path, tail_bytes=2048)
    follower.poll()
    assert follower.state.step == 399 and follower.state.last_eval["eval_loss"] == 3.25


# --- where people look -----------------------------------------------------------------------------------

def _account():
    recs = [{"event": "start", "attempt": 1, "time": 10.0, "step": 0},
            *({"event": "log", "attempt": 1, "time": 10.0 + k, "step": k} for k in range(1, 9))]
    a1 = AttemptFacts(1, started=2.0, ended=21.0, world_size=2, start_step=0, last_beat=18.5, records=recs)
    a2 = AttemptFacts(2, started=23.0, ended=40.0, world_size=2, start_step=4, records=[
        {"event": "start", "attempt": 2, "time": 30.0, "step": 4},
        *({"event": "log", "attempt": 2, "time": 26.0 + k, "step": k} for k in range(5, 11)),
        {"event": "end", "attempt": 2, "time": 37.0, "step": 10, "state": "completed"}])
    return account(JobFacts(0.0, 40.0, "COMPLETED", [a1, a2])).to_json()


def _snap(goodput=None, progress=None):
    job = Job(id="demo-0101-aaaaaa", name="demo", backend="local", state=JobState.COMPLETED, created=NOW - 40,
              updated=NOW, run_dir="/r", config_path="/c.yaml", output_dir="/o", step=10, max_steps=10,
              attempts=[AttemptRecord("demo-0101-aaaaaa", 1, NOW - 38, NOW - 19, failure="KILLED", start_step=0),
                        AttemptRecord("demo-0101-aaaaaa", 2, NOW - 17, NOW, failure="COMPLETED", start_step=4)])
    if progress is None:
        progress = ProgressState(step=10, max_steps=10, loss=1.0, losses=[(k, 5.0 / k) for k in range(1, 11)])
        for r in (eval_rec(5, 1.8), eval_rec(10, 1.2)):
            apply_eval(progress, r)
    return Snapshot(job, progress, NOW, max_restarts=3, goodput=goodput)


def test_status_shows_eval_loss_goodput_bar_and_step_time():
    g = _account()
    text = text_of(detail_frame(_snap(g)))
    assert "eval loss    last 1.2000 (step 10)   best 1.2000 (step 10)" in text
    line = next(line for line in text.splitlines() if line.startswith("goodput"))
    pct = f"{100 * g['fraction']:.0f}% of 0:40 kept"
    assert pct in line and "GPU-h" in line and "badput: start-up" in line and "lost progress" in line
    assert "attempt 1: median 1 s" in text and "attempt 2: median 1 s" in text
    assert f"{EVAL_MARK} = eval loss" in text and text.count(EVAL_MARK) >= 3     # legend + two points


def test_json_has_last_and_best_eval_and_the_goodput_account():
    data = json.loads(json.dumps(snapshot_json(_snap(_account()), detail=True), allow_nan=False))
    assert data["last_eval"]["step"] == 10 and data["last_eval"]["eval_loss"] == 1.2
    assert data["last_eval"]["metrics"]["eval_runtime"] == 0.4 and data["best_eval"] == {"step": 10, "eval_loss": 1.2}
    assert data["evals"] == [[5, 1.8], [10, 1.2]]
    g = data["goodput"]
    assert {"wall_s", "goodput_s", "fraction", "badput_s", "gpu_hours"} <= set(g)
    assert g["goodput_s"] + sum(g["badput_s"].values()) == pytest.approx(g["wall_s"])
    assert snapshot_json(_snap(None, ProgressState()))["last_eval"] is None


def test_the_jobs_table_has_eval_and_goodput_columns():
    g = _account()
    text = text_of(jobs_table([_snap(g)]), 220)
    header, row = text.splitlines()[:2]
    assert "eval" in header and "goodput" in header
    assert "1.2000" in row and f"{100 * g['fraction']:.0f}%" in row
    bare = text_of(jobs_table([_snap(None, ProgressState())]), 220).splitlines()[0]   # nobody evaluates: no columns
    assert "eval" not in bare and "goodput" not in bare and "tok/s" in bare
    mixed = text_of(jobs_table([_snap(g), _snap(None, ProgressState())]), 220).splitlines()
    assert "goodput" in mixed[0] and "eval" in mixed[0] and len(mixed) == 3   # one job has them: shown for all


def test_loss_chart_draws_eval_points_on_the_training_scale():
    rows = loss_chart([(s, 10.0 / s) for s in range(1, 11)], width=20, height=4, overlay=[(5, 2.0), (10, 0.5)])
    body = [r.split("┤", 1)[1] for r in rows[:4]]
    assert sum(line.count(EVAL_MARK) for line in body) == 2
    assert EVAL_MARK in body[-1]                      # 0.5, below every training loss: the bottom row
    assert rows[3].split("┤")[0].strip() == "0.5"     # the scale reaches down to the eval point


def test_end_summary_and_bench_lines_give_the_goodput():
    g = _account()
    summary = final_summary(_snap(g))
    assert "goodput:" in summary and f"{100 * g['fraction']:.0f}% of 0:40 kept" in summary and "GPU-h" in summary
    assert summary_line(None) is None and goodput_text(None) is None and step_time_text({}) is None


def test_finished_jobs_goodput_comes_from_goodput_json_or_the_detail_view_and_is_cached(tmp_path):
    from orchestrator.dashboard.snapshots import SnapshotSource
    from orchestrator.store.goodput_read import GOODPUT_FILE, write_final
    from orchestrator.store.ledger import Ledger

    ledger = Ledger(tmp_path / "ledger.db")
    for job_id in ("old", "new"):
        run = tmp_path / "runs" / job_id
        run.mkdir(parents=True)
        ledger.create_job(job_id=job_id, name="demo", backend="local", run_dir=str(run), config_path="/c.yaml",
                          output_dir=str(run / "output"))
        ledger.start_attempt(job_id, 1, resumed_from=None, start_step=0)
        t = ledger.get(job_id).attempts[0].started
        write(run / "progress.jsonl", [{"event": "start", "attempt": 1, "time": t + 1, "step": 0},
                                       {"event": "log", "attempt": 1, "time": t + 2, "step": 1, "loss": 1.0},
                                       {"event": "end", "attempt": 1, "time": t + 2.5, "step": 1,
                                        "state": "completed"}])
        ledger.update_attempt(job_id, 1, ended=t + 3, failure="COMPLETED")
        ledger.update_job(job_id, state=JobState.COMPLETED)
    write_final(ledger.get("new"))                       # what the supervisor does when a job ends
    assert (tmp_path / "runs" / "new" / GOODPUT_FILE).exists()
    table = {s.job.id: s for s in SnapshotSource.for_ledger(ledger).all()}
    assert table["new"].goodput["goodput_s"] == pytest.approx(1.0) and table["old"].goodput is None
    assert SnapshotSource.for_ledger(ledger).one("old").goodput["goodput_s"] == pytest.approx(1.0)
    again = {s.job.id: s for s in SnapshotSource.for_ledger(ledger).all()}   # the detail view's, cached
    assert again["old"].goodput["goodput_s"] == pytest.approx(1.0)
    ledger.update_job("new", message="touched")          # changed since goodput.json: not trusted any more
    assert {s.job.id: s for s in SnapshotSource(ledger).all()}["new"].goodput is None

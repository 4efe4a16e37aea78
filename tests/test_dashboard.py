"""The dashboard (issue 5): pure renderers on a captured console, snapshots and their caches,
logs with rank prefixes and the first error, the report, and the CLI verbs without a terminal."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.dashboard.charts import bar, loss_chart
from orchestrator.dashboard.live import LiveView, make_console, watch
from orchestrator.dashboard.logview import show_logs
from orchestrator.dashboard.render import (
    Snapshot,
    attempt_label,
    detail_frame,
    job_detail,
    jobs_table,
    list_table,
    snapshot_json,
    status_frame,
)
from orchestrator.dashboard.snapshots import SnapshotSource, tail_follower
from orchestrator.states import JobState
from orchestrator.store.ledger import AttemptRecord, Job, Ledger
from orchestrator.store.logs import FirstError, LogFollower, find_traceback, first_error, rank_logs, tail_lines
from orchestrator.store.progress import ProgressState
from orchestrator.worker import channel

REPO = Path(__file__).resolve().parents[1]
NOW = 50_000.0
ESC = "\x1b"


def text_of(renderable, width: int = 120, terminal: bool = False) -> str:
    console = Console(record=True, width=width, force_terminal=terminal, color_system="truecolor" if terminal else None,
                      file=io.StringIO())
    console.print(renderable)
    return console.export_text(styles=terminal) if terminal else console.export_text()


def job(job_id: str = "demo-0101-aaaaaa", state: JobState = JobState.RUNNING, attempts=(), **kw) -> Job:
    fields = dict(id=job_id, name="demo", backend="local", state=state, created=NOW - 300, updated=NOW - 10,
                  run_dir=f"/runs/{job_id}", config_path="/c.yaml", output_dir="/out", step=0, max_steps=40)
    return Job(**{**fields, **kw}, attempts=list(attempts))


def attempt(n: int, failure: str | None = None, **kw) -> AttemptRecord:
    fields = dict(job_id="demo-0101-aaaaaa", n=n, started=NOW - 300 + 60 * n, ended=None if failure is None else
                  NOW - 250 + 60 * n, exit_code=None if failure is None else 1, failure=failure,
                  start_step=0 if n == 1 else 10, end_step=None if failure is None else 14)
    return AttemptRecord(**{**fields, **kw})


def prog(step: int = 20, **kw) -> ProgressState:
    fields = dict(step=step, max_steps=40, loss=2.5, tokens_per_s=2000.0, losses=[(s, 6.0 / s) for s in range(2, step + 1, 2)],
                  last_checkpoint="/out/checkpoint-10", last_checkpoint_step=10, rate_start=(NOW - 20, 10),
                  rate_end=(NOW, step))
    return ProgressState(**{**fields, **kw})


# --- pure renderers ------------------------------------------------------------------------------------

def test_table_drops_columns_to_fit_a_narrow_terminal_and_keeps_the_essentials():
    snaps = [Snapshot(job(message="attempt 1 started " * 5, attempts=[attempt(1)]), prog(), NOW, max_restarts=3)]
    wide, narrow = text_of(jobs_table(snaps), 200), text_of(jobs_table(snaps), 72)
    assert "trend" in wide and "last event" in wide and "attempt 1 started" in wide
    assert all(len(line) <= 72 for line in narrow.splitlines())
    row = next(line for line in narrow.splitlines() if "demo-0101-aaaaaa" in line)
    assert "RUNNING" in row and "20/40" in row and "1/4" in row and "trend" not in narrow


def test_table_limits_rows_and_says_how_many_are_hidden():
    snaps = [Snapshot(job(f"job-{i:03d}"), prog(), NOW) for i in range(30)]
    text = text_of(jobs_table(snaps, max_rows=5))
    assert "job-004" in text and "job-005" not in text and "25 more job(s) not shown" in text


def test_status_frame_puts_active_jobs_first_and_counts_states():
    snaps = [Snapshot(job("old-done", JobState.COMPLETED, created=NOW - 900), prog(40), NOW),
             Snapshot(job("new-fail", JobState.FAILED, created=NOW - 100), prog(7), NOW),
             Snapshot(job("mid-run", JobState.RUNNING, created=NOW - 500), prog(), NOW)]
    lines = text_of(status_frame(snaps, NOW, hint="Ctrl-C leaves")).splitlines()
    assert "3 job(s)" in lines[0] and "1 RUNNING" in lines[0] and "1 FAILED" in lines[0]
    order = [name for line in lines for name in ("mid-run", "new-fail", "old-done") if line.startswith(name)]
    assert order == ["mid-run", "new-fail", "old-done"] and lines[-1] == "Ctrl-C leaves"


def test_empty_ledger_says_how_to_start():
    assert "no jobs yet: orchestrate submit CONFIG" in text_of(status_frame([], NOW))
    assert "no jobs" in text_of(list_table([], NOW))


def test_attempt_budget_counts_restarts_and_not_graceful_stops():
    runs = [attempt(1, "PREEMPTED"), attempt(2, "CRASHED"), attempt(3)]
    assert attempt_label(Snapshot(job(attempts=runs), prog(), NOW, max_restarts=2)) == "3/4"
    assert attempt_label(Snapshot(job(attempts=runs), prog(), NOW)) == "3"
    assert attempt_label(Snapshot(job(), ProgressState(), NOW, max_restarts=0)) == "0/1"


def test_detail_shows_chart_attempts_first_error_and_logs():
    j = job(attempts=[attempt(1, "CRASHED", message=None), attempt(2, resumed_from="/out/checkpoint-10")])
    err = FirstError(rank=1, summary="RuntimeError: injected fault", step=14, time=NOW)
    snap = Snapshot(j, prog(), NOW, max_restarts=3, errors={1: err}, log_dir="/runs/x/attempts/2/ranks")
    text = text_of(detail_frame(snap, "Ctrl-C CANCELS this job"))
    assert text.splitlines()[0] == "Ctrl-C CANCELS this job"          # on top: never cropped away
    assert "attempt 2/4" in text and "20/40 (50%)" in text
    assert "first error, attempt 1: rank 1 (step 14): RuntimeError: injected fault" in text
    assert "orchestrate logs demo-0101-aaaaaa --attempt 1 --errors" in text
    assert "orchestrate logs demo-0101-aaaaaa -f   (/runs/x/attempts/2/ranks)" in text
    assert "┴" in text and "an attempt resumed here" in text            # attempt 2 started at step 10
    crashed = next(line for line in text.splitlines() if "CRASHED" in line)
    assert "rank 1 (step 14): RuntimeError" in crashed and "4" in crashed  # steps gained 14 - 10


def test_terminal_output_is_coloured_and_plain_output_is_not():
    frame = status_frame([Snapshot(job(), prog(), NOW, max_restarts=3)], NOW)
    assert ESC in text_of(frame, terminal=True)
    buf = io.StringIO()
    make_console(buf).print(frame)
    make_console(buf).print(detail_frame(Snapshot(job(attempts=[attempt(1)]), prog(), NOW), "hint"))
    assert ESC not in buf.getvalue() and "demo-0101-aaaaaa" in buf.getvalue()


def test_a_thousand_jobs_render_every_row():
    snaps = [Snapshot(job(f"bench-{i:04d}", JobState.COMPLETED, attempts=[attempt(1, "COMPLETED")]), prog(40), NOW,
                      max_restarts=3) for i in range(1000)]
    buf = io.StringIO()
    make_console(buf).print(status_frame(snaps, NOW))
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1002 and sum(line.startswith("bench-") for line in lines) == 1000
    assert "1000 job(s)" in lines[0] and all("40/40" in line for line in lines[2:])


def test_loss_chart_shape_marks_and_nan():
    points = [(s, 10.0 / s) for s in range(1, 21)]
    rows = loss_chart(points, width=40, height=6, marks=(11,))
    assert len(rows) == 6 + 2
    body = [r.split("┤", 1)[1] for r in rows[:6]]
    assert body[0].startswith("█") and body[-1].endswith(("▁", "▂")) and "┴" in rows[6]
    assert rows[0].split("┤")[0].strip() == "10" and "step 1" in rows[7] and rows[7].rstrip().endswith("20")
    assert "!" in loss_chart([(1, 2.0), (2, float("nan")), (3, 1.0)], width=30)[0]
    assert loss_chart([]) == []


def test_bar_is_width_cells_in_eighths():
    assert bar(0.0, 8) == ("", "░" * 8)
    assert bar(1.0, 8) == ("█" * 8, "")
    done, rest = bar(0.5 + 1 / 16, 8)
    assert done == "████▌" and len(done + rest) == 8


def test_snapshot_json_is_strict_json():
    snap = Snapshot(job(attempts=[attempt(1, "CRASHED")]), prog(loss=float("nan")), NOW, max_restarts=1,
                    errors={1: FirstError(rank=0, summary="boom")})
    data = json.loads(json.dumps(snapshot_json(snap, detail=True), allow_nan=False))
    assert data["loss"] is None and data["attempt_budget"] == 2 and data["first_errors"]["1"]["rank"] == 0
    assert data["losses"][0] == [2, 3.0] and data["step"] == 20 and data["eta_s"] == pytest.approx(40.0)


# --- snapshots from disk -------------------------------------------------------------------------------

def make_ledger_job(home: Path, job_id: str, state: JobState = JobState.RUNNING, records: int = 30,
                    max_restarts: int = 2) -> Job:
    ledger = Ledger(home / "ledger.db")
    run_dir = home / "runs" / job_id
    run_dir.mkdir(parents=True)
    channel.write_json_atomic(run_dir / "plan.json", {"retry": {"max_restarts": max_restarts},
                                                      "worker_config": {"max_steps": 10**6}, "nproc_per_node": 2})
    with open(run_dir / "progress.jsonl", "w") as f:
        f.write(json.dumps({"event": "start", "attempt": 1, "step": 0, "world_size": 2}) + "\n")
        for s in range(1, records + 1):
            f.write(json.dumps({"event": "log", "attempt": 1, "step": s, "time": 1000.0 + s, "loss": 5.0 / s,
                                "tokens_per_s": 100.0 + s}) + "\n")
            if s % 100 == 0:
                f.write(json.dumps({"event": "checkpoint", "attempt": 1, "step": s,
                                    "path": f"/o/checkpoint-{s}"}, sort_keys=True) + "\n")
    ledger.create_job(job_id=job_id, name="demo", backend="local", run_dir=str(run_dir), config_path="/c.yaml",
                      output_dir=str(run_dir / "output"))
    ledger.start_attempt(job_id, 1, pid=None, resumed_from=None, start_step=0)
    ledger.update_job(job_id, state=state)
    return ledger.get(job_id)


def test_tail_follower_reads_the_end_only_and_finds_an_older_checkpoint(tmp_path):
    j = make_ledger_job(tmp_path, "big", records=5000)
    path = Path(j.run_dir) / "progress.jsonl"
    follower = tail_follower(path, tail_bytes=4096)
    assert follower.offset > path.stat().st_size - 4096
    new = follower.poll()
    assert 0 < len(new) < 100 and new[-1]["step"] == 5000 and {r["event"] for r in new} <= {"log", "checkpoint"}
    s = follower.state
    assert s.step == 5000 and s.loss == pytest.approx(5.0 / 5000) and s.last_checkpoint_step == 5000
    with open(path, "a") as f:   # more logs after the last checkpoint than the tail holds
        for k in range(1, 200):
            f.write(json.dumps({"event": "log", "attempt": 1, "step": 5000 + k, "loss": 1.0}) + "\n")
    again = tail_follower(path, tail_bytes=4096)
    again.poll()
    assert again.state.step == 5199 and again.state.last_checkpoint == "/o/checkpoint-5000"


def test_finished_jobs_come_from_the_persistent_cache(tmp_path, monkeypatch):
    done = make_ledger_job(tmp_path, "done", JobState.COMPLETED)
    make_ledger_job(tmp_path, "live", JobState.RUNNING)
    ledger = Ledger(tmp_path / "ledger.db")
    first = {s.job.id: s for s in SnapshotSource.for_ledger(ledger).all()}
    assert (tmp_path / "cache" / "dashboard.json").exists()
    assert first["done"].progress.step == 30 and first["done"].max_restarts == 2
    read = []
    import orchestrator.dashboard.snapshots as snapshots

    real = snapshots.tail_follower
    monkeypatch.setattr(snapshots, "tail_follower", lambda path, n: read.append(Path(path).parent.name) or real(path, n))
    second = {s.job.id: s for s in SnapshotSource.for_ledger(ledger).all()}
    assert read == ["live"]                                   # the finished job was not read again
    assert second["done"].progress.step == 30 and second["done"].progress.loss == first["done"].progress.loss
    ledger.update_job(done.id, state=JobState.RUNNING)       # resumed: the cache entry no longer applies
    SnapshotSource.for_ledger(ledger).all()
    assert sorted(read) == ["done", "live", "live"]


def test_live_source_rereads_only_changed_ledger_rows(tmp_path):
    make_ledger_job(tmp_path, "a", JobState.COMPLETED)
    make_ledger_job(tmp_path, "b", JobState.RUNNING)
    ledger = Ledger(tmp_path / "ledger.db")
    clock = [time.time()]
    source = SnapshotSource(ledger, clock=lambda: clock[0])
    assert [s.job.id for s in source.all(incremental=True)] == ["b", "a"]
    clock[0] += 60   # past the slack: nothing changed since
    assert ledger.jobs_updated_since(clock[0] - 10) == []
    ledger.update_job("b", step=7)
    snaps = {s.job.id: s for s in source.all(incremental=True)}
    assert snaps["b"].job.step == 7 and snaps["a"].job.state is JobState.COMPLETED


# --- logs ----------------------------------------------------------------------------------------------

def write_rank_logs(attempt_dir: Path, ranks: dict[int, tuple[str, str]], node: str | None = None) -> None:
    base = attempt_dir / "ranks" / (node or "") / "run-1_abc" / "attempt_0"
    for r, (out, err) in ranks.items():
        (base / str(r)).mkdir(parents=True, exist_ok=True)
        (base / str(r) / "stdout.log").write_text(out)
        (base / str(r) / "stderr.log").write_text(err)


TRACE = ("warming up\nTraceback (most recent call last):\n  File \"w.py\", line 3, in <module>\n    boom()\n"
         "RuntimeError: boom\nafter\n")


def test_rank_logs_order_and_global_ranks_on_slurm_nodes(tmp_path):
    write_rank_logs(tmp_path, {0: ("a\n", ""), 1: ("b\n", "")}, node="node1")
    write_rank_logs(tmp_path, {0: ("c\n", ""), 1: ("d\n", "")}, node="node0")
    logs = rank_logs(tmp_path)
    assert [(r.rank, r.stream) for r in logs][:4] == [(0, "stdout"), (0, "stderr"), (1, "stdout"), (1, "stderr")]
    assert sorted({r.rank for r in logs}) == [0, 1, 2, 3]
    assert next(r for r in logs if r.rank == 3).path.parts[-5] == "node1"


def test_first_error_is_a_killed_rank_then_the_earliest_record(tmp_path):
    # issue 13: after a kill -9 of rank 1, rank 0's "Connection reset by peer" is an echo, not the cause
    assert first_error(tmp_path) is None
    for rank, t, msg in ((0, 20.0, "echo: connection reset"), (3, 10.0, "CUDA error\nsecond line")):
        channel.write_json_atomic(tmp_path / f"error-rank{rank}.json", {"rank": rank, "type": "RuntimeError",
                                                                        "message": msg, "time": t, "step": 5})
    assert first_error(tmp_path).line() == "rank 3 (step 5): RuntimeError: CUDA error"
    channel.write_json_atomic(tmp_path / "agent.json", {"failures": {"0": {"signal": "SIGTERM", "exitcode": -15},
                                                                     "1": {"signal": "SIGKILL", "exitcode": -9}}})
    assert first_error(tmp_path).line() == "rank 1: killed by SIGKILL (exit -9)"


def test_find_traceback_returns_the_block(tmp_path):
    (tmp_path / "err.log").write_text(TRACE)
    line, block = find_traceback(tmp_path / "err.log")
    assert line == 2 and block[0].startswith("Traceback") and block[-1] == "RuntimeError: boom"
    (tmp_path / "ok.log").write_text("fine\n")
    assert find_traceback(tmp_path / "ok.log") is None


def test_tail_lines_and_follower_handle_partial_lines_and_carriage_returns(tmp_path):
    path = tmp_path / "x.log"
    path.write_text("".join(f"line {i}\n" for i in range(1000)) + "partial")
    lines, offset = tail_lines(path, 3, block=64)
    assert lines == ["line 997", "line 998", "line 999"] and offset == path.stat().st_size - len("partial")
    follower = LogFollower()
    follower.add(rank_logs_stub(path), offset)
    assert follower.poll() == []
    with open(path, "a") as f:
        f.write(" done\nbar 10%\rbar 100%\n")
    assert [line for _, line in follower.poll()] == ["partial done", "bar 100%"]


def rank_logs_stub(path: Path):
    from orchestrator.store.logs import RankLog

    return RankLog(0, "stdout", path)


def failed_job(home: Path) -> Job:
    j = make_ledger_job(home, "fail-0101-bbbbbb", JobState.RUNNING)
    adir = Path(j.run_dir) / "attempts" / "1"
    write_rank_logs(adir, {0: ("step 1\nstep 2\n", ""), 1: ("step 1\n", TRACE)})
    channel.write_json_atomic(adir / "error-rank1.json", {"rank": 1, "type": "RuntimeError", "message": "boom",
                                                          "time": 5.0, "step": 2, "traceback": "Traceback ...\nRuntimeError: boom\n"})
    ledger = Ledger(home / "ledger.db")
    ledger.update_attempt(j.id, 1, ended=time.time(), failure="CRASHED", exit_code=1)
    ledger.update_job(j.id, state=JobState.FAILED, message="attempt 1 ended: CRASHED")
    return ledger.get(j.id)


def test_logs_prefix_every_line_with_its_rank_and_point_at_the_first_error(tmp_path):
    j, out = failed_job(tmp_path), io.StringIO()
    assert show_logs(Ledger(tmp_path / "ledger.db"), j, out=out) == 0
    text = out.getvalue()
    assert "[rank 0] step 2\n" in text and "[rank 1] RuntimeError: boom\n" in text
    assert "==> attempt 1: first error on rank 1 (step 2): RuntimeError: boom <==" in text
    assert "orchestrate logs fail-0101-bbbbbb --attempt 1 --errors" in text and "stderr.log:2)" in text
    out = io.StringIO()
    show_logs(Ledger(tmp_path / "ledger.db"), j, rank=0, lines=1, out=out)
    assert [x for x in out.getvalue().splitlines() if x.startswith("[rank")] == ["[rank 0] step 2"]
    out = io.StringIO()
    show_logs(Ledger(tmp_path / "ledger.db"), j, errors=True, out=out)
    assert out.getvalue().startswith("==> attempt 1: first error") and "Traceback ...\nRuntimeError: boom" in out.getvalue()


def test_logs_follow_prints_new_lines_until_the_job_ends(tmp_path):
    j = make_ledger_job(tmp_path, "run-0101-cccccc", JobState.RUNNING)
    ledger = Ledger(tmp_path / "ledger.db")
    adir = Path(j.run_dir) / "attempts" / "1"
    write_rank_logs(adir, {0: ("old 1\nold 2\n", ""), 1: ("", "")})
    log1 = next(p for p in adir.glob("ranks/**/1/stdout.log"))
    ticks = []

    def sleep(_):   # the "time" between polls: the worker writes, then the job ends
        ticks.append(1)
        if len(ticks) == 2:
            with open(log1, "a") as f:
                f.write("new line\n")
        if len(ticks) == 4:
            ledger.update_attempt(j.id, 1, ended=time.time(), failure="COMPLETED")
            ledger.update_job(j.id, state=JobState.COMPLETED, message="completed")
        time.sleep(0.35)

    out = io.StringIO()
    assert show_logs(ledger, j, follow=True, lines=1, out=out, sleep=sleep) == 0
    text = out.getvalue()
    assert "[rank 0] old 1" not in text and "[rank 0] old 2" in text and "[rank 1] new line" in text
    assert text.rstrip().endswith("==> run-0101-cccccc: COMPLETED (completed) <==")


# --- live views ------------------------------------------------------------------------------------------

def test_live_view_of_submit_says_ctrl_c_cancels_and_prints_events_through_the_display(tmp_path):
    j = make_ledger_job(tmp_path, "sub-0101-dddddd")
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120, height=60, color_system=None)
    with LiveView(Ledger(tmp_path / "ledger.db"), j.id, interval=0.05, console=console) as view:
        view.event("attempt 1 started [rank 0]")
        time.sleep(0.2)
    out = buf.getvalue()
    assert "Ctrl-C CANCELS this job" in out and "submit --detach" in out
    assert "attempt 1 started [rank 0]" in out and "sub-0101-dddddd (demo, local)" in out


def test_watch_redraws_until_stopped_and_a_job_view_ends_with_its_job(tmp_path):
    j = make_ledger_job(tmp_path, "w-0101-eeeeee")
    ledger = Ledger(tmp_path / "ledger.db")
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=160, height=30, color_system=None)
    stop = threading.Event()
    t = threading.Thread(target=watch, args=(ledger,), kwargs=dict(interval=0.05, console=console, stop=stop))
    t.start()
    time.sleep(0.3)
    ledger.update_job(j.id, state=JobState.COMPLETED)
    time.sleep(0.3)
    stop.set()
    t.join(5)
    assert not t.is_alive() and "RUNNING" in buf.getvalue() and "COMPLETED" in buf.getvalue()
    done = threading.Thread(target=watch, args=(ledger, j.id), kwargs=dict(interval=0.05, console=console))
    done.start()
    done.join(5)
    assert not done.is_alive()        # the job has ended: one frame, then back to the prompt


# --- report ----------------------------------------------------------------------------------------------

def test_report_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from orchestrator.dashboard.report import read_series, write_report

    j = make_ledger_job(tmp_path, "rep-0101-ffffff", JobState.COMPLETED, records=40)
    channel.append_jsonl(Path(j.run_dir) / "progress.jsonl", {"event": "start", "attempt": 2, "step": 30})
    channel.append_jsonl(Path(j.run_dir) / "progress.jsonl", {"event": "log", "attempt": 2, "step": 32, "loss": 0.2,
                                                              "tokens_per_s": 90.0})
    series = read_series(Path(j.run_dir) / "progress.jsonl")
    assert [s.attempt for s in series] == [1, 2] and series[1].start_step == 30 and len(series[0].loss) == 40
    out = write_report(j, tmp_path / "r" / "report.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_report_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    from orchestrator.dashboard import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    with pytest.raises(report.ReportUnavailable, match=r"pip install 'orchestrate\[report\]'"):
        report.write_report(job(), tmp_path / "x.png")


# --- the CLI without a terminal --------------------------------------------------------------------------

def cli(home: Path, *args: str, python_args=()) -> subprocess.CompletedProcess:
    env = {"ORCHESTRATE_HOME": str(home), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *python_args, "-m", "orchestrator.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_verbs_print_plain_text_into_a_pipe(tmp_path):
    failed_job(tmp_path)
    make_ledger_job(tmp_path, "ok-0101-111111", JobState.COMPLETED)
    out = {}
    for args in (["status"], ["status", "fail"], ["list"], ["logs", "fail"]):   # not a terminal: one frame
        r = cli(tmp_path, *args)
        assert r.returncode == 0, (args, r.stderr)
        assert ESC not in r.stdout and "fail-0101-bbbbbb" in r.stdout, args
        out[" ".join(args)] = r.stdout
    assert "first error, attempt 1: rank 1 (step 2): RuntimeError: boom" in out["status fail"]
    assert "[rank 1] RuntimeError: boom" in out["logs fail"]
    listed = cli(tmp_path, "list", "--state", "failed").stdout
    assert "fail-0101-bbbbbb" in listed and "ok-0101-111111" not in listed
    data = json.loads(cli(tmp_path, "status", "--json").stdout)
    assert {d["id"]: d["state"] for d in data} == {"fail-0101-bbbbbb": "FAILED", "ok-0101-111111": "COMPLETED"}
    assert cli(tmp_path, "logs", "fail", "--attempt", "7").returncode == 2


def test_help_and_status_import_neither_torch_nor_transformers(tmp_path):
    make_ledger_job(tmp_path, "imp-0101-222222", JobState.COMPLETED)
    for args in (["--help"], ["status", "--once"], ["status", "imp"], ["logs", "imp"]):
        r = cli(tmp_path, *args, python_args=("-X", "importtime"))
        assert r.returncode == 0, r.stderr
        mods = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines() if "import time:" in line}
        assert "rich" in mods or args == ["--help"] or args[0] == "logs"
        assert not mods & {"torch", "transformers", "trl", "accelerate", "datasets", "matplotlib"}, args


def test_detail_fits_a_short_terminal_by_shrinking_the_chart():
    snap = Snapshot(job(attempts=[attempt(1, "CRASHED"), attempt(2)]), prog(), NOW, max_restarts=3)
    tall = text_of(detail_frame(snap, "hint", width=100, height=60), width=100)
    short = text_of(detail_frame(snap, "hint", width=100, height=24), width=100)
    assert tall.count("┤") == 8 and "┤" not in short
    assert len(short.splitlines()) <= 24 and "CRASHED" in short


def test_a_resumed_job_is_read_again_when_it_ends_again(tmp_path):
    j = make_ledger_job(tmp_path, "again", JobState.COMPLETED, records=10)
    ledger = Ledger(tmp_path / "ledger.db")
    source = SnapshotSource(ledger)
    assert source.snapshot(j).progress.step == 10
    ledger.update_job(j.id, state=JobState.RUNNING)
    assert source.snapshot(ledger.get(j.id)).progress.step == 10
    channel.append_jsonl(Path(j.run_dir) / "progress.jsonl", {"event": "log", "attempt": 2, "step": 12, "loss": 0.1})
    ledger.update_job(j.id, state=JobState.COMPLETED)
    assert source.snapshot(ledger.get(j.id)).progress.step == 12


# --- one owner per job and SLURM attempts (issues 10, 11) -------------------------------------------------

def test_detail_shows_where_each_slurm_attempt_ran_and_json_carries_it():
    atts = [attempt(1, "KILLED", scheduler_job_id="33", external_id="33.0", nodes="n1,n2", world_size=2),
            attempt(2, "PREEMPTED", scheduler_job_id="33", external_id="33.1", nodes="n1,n2", world_size=2, in_place=1),
            attempt(3, None, scheduler_job_id="33", external_id="33.0", nodes="n1,n3", world_size=2, in_place=0)]
    snap = Snapshot(job(backend="slurm", attempts=atts, scheduler_job_id="33"), prog(), NOW, max_restarts=3)
    text = text_of(job_detail(snap), 220)
    assert "SLURM 33.1 on n1,n2, in place" in text and "SLURM 33.0 on n1,n3, via the queue" in text
    data = snapshot_json(snap, detail=True)
    assert [(a["scheduler_job_id"], a["nodes"], a["world_size"], a["in_place"]) for a in data["attempts"]] == [
        ("33", "n1,n2", 2, None), ("33", "n1,n2", 2, 1), ("33", "n1,n3", 2, 0)]
    assert data["supervisor"] == {"alive": False, "host": None, "pid": None, "heartbeat_age_s": None}


def test_a_job_whose_supervisor_is_gone_is_marked_with_the_command_that_adopts_it():
    from orchestrator.store.lease import SupervisorHealth

    gone = SupervisorHealth(alive=False, host="h", pid=42, heartbeat_age_s=95.0)
    snap = Snapshot(job(attempts=[attempt(1)]), prog(), NOW, max_restarts=3, supervisor=gone)
    assert "! supervisor gone: orchestrate resume demo-0101-aaaaaa" in text_of(jobs_table([snap]), 250)
    assert "GONE (pid 42 on h, last heartbeat 1:35 ago)" in text_of(job_detail(snap), 200)
    queued = Snapshot(job(backend="slurm", state=JobState.PENDING, scheduler_job_id="77"), prog(0), NOW,
                      supervisor=SupervisorHealth(alive=False))
    assert "GONE" not in text_of(job_detail(queued), 200) and "SLURM job 77" in text_of(job_detail(queued), 200)


def test_while_an_attempt_starts_the_table_says_so_instead_of_the_last_event():
    starting = Snapshot(job(message="attempt 1 started", attempts=[attempt(1)]), prog(0, losses=[]), NOW,
                        heartbeat={"phase": "loading", "since": NOW - 5})
    text = text_of(jobs_table([starting]), 200)
    assert "starting up (loading)" in text and "attempt 1 started" not in text
    training = Snapshot(job(message="attempt 1 started", attempts=[attempt(1)]), prog(), NOW,
                        heartbeat={"phase": "training", "since": NOW - 5})
    assert "starting up" not in text_of(jobs_table([training]), 200)

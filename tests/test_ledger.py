"""The SQLite ledger: jobs, attempts, filters, short ids, JSON form, two writers on one file."""
from __future__ import annotations

import itertools
import json
import sqlite3
import threading
import types

import pytest

from orchestrator.states import JobState
from orchestrator.store import ledger as ledger_mod
from orchestrator.store.ledger import Ledger, dumps


@pytest.fixture
def clock(monkeypatch):
    """The ledger's time.time(), one second per call: creation order is never a tie."""
    ticks = itertools.count(1000)
    monkeypatch.setattr(ledger_mod, "time", types.SimpleNamespace(time=lambda: float(next(ticks))))


@pytest.fixture
def ledger(tmp_path, clock) -> Ledger:
    return Ledger.for_home(tmp_path / "home")


def add(ledger: Ledger, job_id: str, **kw) -> None:
    args = dict(name=job_id.split("-")[0], backend="local", run_dir=str(ledger.runs / job_id),
                config_path="/c.yaml", output_dir=f"/runs/{job_id}/output", max_steps=40)
    ledger.create_job(job_id=job_id, **{**args, **kw})


def test_create_and_get(ledger):
    add(ledger, "demo-0101-aaaaaa")
    assert (ledger.runs / "demo-0101-aaaaaa" / "ledger" / "job.json").is_file()   # the truth: a file
    assert not ledger.path.exists()            # the index is made when something is listed
    ledger.jobs()
    assert ledger.path.is_file()
    job = ledger.get("demo-0101-aaaaaa")
    assert job.state is JobState.PENDING
    assert (job.name, job.backend, job.run_dir, job.output_dir) == (
        "demo", "local", str(ledger.runs / "demo-0101-aaaaaa"), "/runs/demo-0101-aaaaaa/output")
    assert (job.step, job.max_steps, job.attempts) == (0, 40, [])
    assert job.created == job.updated


def test_get_unknown_job_is_none(ledger):
    assert ledger.get("nope") is None


def test_duplicate_job_id_is_refused(ledger):
    add(ledger, "a-1")
    with pytest.raises(FileExistsError):
        add(ledger, "a-1")


def test_update_job(ledger):
    add(ledger, "a-1")
    created = ledger.get("a-1").created
    ledger.update_job("a-1", state=JobState.RUNNING, step=12, supervisor_pid=4242, message="attempt 1 started")
    job = ledger.get("a-1")
    assert (job.state, job.step, job.supervisor_pid, job.message) == (JobState.RUNNING, 12, 4242, "attempt 1 started")
    assert job.updated > created
    ledger.update_job("a-1", state="FAILED")  # a plain string works too
    assert ledger.get("a-1").state is JobState.FAILED


def test_jobs_newest_first_with_state_filter_and_limit(ledger):
    for i, state in enumerate([JobState.COMPLETED, JobState.RUNNING, JobState.FAILED, JobState.RUNNING]):
        add(ledger, f"j-{i}")
        ledger.update_job(f"j-{i}", state=state)
    assert [j.id for j in ledger.jobs()] == ["j-3", "j-2", "j-1", "j-0"]
    assert [j.id for j in ledger.jobs([JobState.RUNNING])] == ["j-3", "j-1"]
    assert [j.id for j in ledger.jobs([JobState.COMPLETED, JobState.FAILED])] == ["j-2", "j-0"]
    assert [j.id for j in ledger.jobs(limit=2)] == ["j-3", "j-2"]
    assert ledger.jobs([JobState.CANCELLED]) == []


def test_jobs_carry_their_own_attempts(ledger):
    add(ledger, "a-1")
    add(ledger, "b-1")
    ledger.start_attempt("a-1", 1, pid=1, resumed_from=None, start_step=0)
    ledger.start_attempt("a-1", 2, pid=2, resumed_from="/o/checkpoint-10", start_step=10)
    by_id = {j.id: j for j in ledger.jobs()}
    assert [a.n for a in by_id["a-1"].attempts] == [1, 2]
    assert by_id["b-1"].attempts == []


@pytest.mark.parametrize("ref, want", [
    ("demo-0101-abc123", ["demo-0101-abc123"]),        # exact id
    ("demo-0101-a", ["demo-0101-abc123"]),             # unique prefix
    ("demo-0101-", ["demo-0101-abc123", "demo-0101-def456"]),  # ambiguous: every match, oldest first
    ("demo", ["demo-0101-abc123", "demo-0101-def456", "demo-0101"]),
    ("my_job", ["my_job-0101-000000"]),                # '_' is a character, not a LIKE wildcard
    ("my-job", ["my-job-0101-111111"]),
    ("DEMO", []),                                      # case matters, like the ids on disk
    ("%", []),
    ("zzz", []),
])
def test_find_by_prefix(ledger, ref, want):
    for job_id in ("demo-0101-abc123", "demo-0101-def456", "demo-0101", "my_job-0101-000000", "my-job-0101-111111"):
        add(ledger, job_id)
    assert ledger.find(ref) == want


def test_exact_id_wins_over_longer_ids_it_prefixes(ledger):
    add(ledger, "demo-0101")
    add(ledger, "demo-0101-abc123")
    assert ledger.find("demo-0101") == ["demo-0101"]


def test_attempts(ledger):
    add(ledger, "a-1")
    ledger.start_attempt("a-1", 1, pid=100, resumed_from=None, start_step=0)
    ledger.update_attempt("a-1", 1, ended=2000.0, exit_code=-9, failure="KILLED", end_step=20, gained_checkpoint=1,
                          message="rank 1 killed by SIGKILL")
    ledger.start_attempt("a-1", 2, pid=101, resumed_from="/o/checkpoint-20", start_step=20)
    a1, a2 = ledger.get("a-1").attempts
    assert (a1.n, a1.pid, a1.exit_code, a1.failure, a1.gained_checkpoint, a1.steps_gained) == (
        1, 100, -9, "KILLED", 1, 20)
    assert a1.ended == 2000.0 and a1.message == "rank 1 killed by SIGKILL"
    assert (a2.n, a2.resumed_from, a2.start_step, a2.ended, a2.steps_gained) == (
        2, "/o/checkpoint-20", 20, None, None)


def test_to_json(ledger):
    add(ledger, "a-1")
    ledger.update_job("a-1", state=JobState.RESUMING, step=20)
    ledger.start_attempt("a-1", 1, pid=100, resumed_from=None, start_step=0)
    ledger.update_attempt("a-1", 1, exit_code=1, failure="CRASHED", end_step=20)
    ledger.start_attempt("a-1", 2, pid=101, resumed_from="/o/checkpoint-20", start_step=20)
    data = json.loads(dumps(ledger.get("a-1")))
    assert (data["id"], data["state"], data["step"], data["max_steps"], data["run_dir"]) == (
        "a-1", "RESUMING", 20, 40, str(ledger.runs / "a-1"))
    first, second = data["attempts"]
    assert (first["exit_code"], first["failure"], first["resumed_from"], first["steps_gained"]) == (
        1, "CRASHED", None, 20)
    assert (second["exit_code"], second["failure"], second["resumed_from"]) == (None, None, "/o/checkpoint-20")


def test_jobs_using_output_dir(ledger):
    add(ledger, "a-1", output_dir="/shared/out")
    add(ledger, "b-1", output_dir="/shared/out")
    add(ledger, "c-1")
    assert sorted(j.id for j in ledger.jobs_using_output_dir("/shared/out")) == ["a-1", "b-1"]
    assert ledger.jobs_using_output_dir("/elsewhere") == []


def test_the_index_is_rebuilt_from_the_files_and_another_hosts_index_sees_the_same_jobs(ledger):
    add(ledger, "a-1")
    ledger.start_attempt("a-1", 1, resumed_from=None, start_step=0)
    ledger.update_job("a-1", state=JobState.RUNNING, step=7)
    assert [j.step for j in ledger.jobs()] == [7]
    other = Ledger(ledger.path.parent / "login2.db", ledger.runs)   # another login node, same run directories
    assert [(j.id, j.state, j.step, len(j.attempts)) for j in other.jobs()] == [("a-1", JobState.RUNNING, 7, 1)]
    ledger.update_job("a-1", state=JobState.COMPLETED)
    assert other.jobs()[0].state is JobState.COMPLETED and other.find("a-") == ["a-1"]
    ledger.path.unlink()                                             # the index holds nothing of its own
    assert [j.state for j in ledger.jobs()] == [JobState.COMPLETED]


def test_a_run_directory_that_is_gone_leaves_the_index(ledger):
    import shutil

    add(ledger, "a-1")
    add(ledger, "b-1")
    assert len(ledger.jobs()) == 2
    shutil.rmtree(ledger.runs / "a-1")
    assert [j.id for j in ledger.jobs()] == ["b-1"]


def test_a_job_must_live_in_its_run_directory(ledger):
    with pytest.raises(ValueError, match="run directory must be"):
        ledger.create_job(job_id="a-1", name="a", backend="local", run_dir="/elsewhere", config_path="c",
                          output_dir="o")


def test_a_01_ledger_is_moved_into_the_run_directories(tmp_path):
    home = tmp_path / "home"
    run_dir = home / "runs" / "old-1"
    run_dir.mkdir(parents=True)
    with sqlite3.connect(home / "ledger.db") as c:
        c.execute("CREATE TABLE jobs (id TEXT, name TEXT, backend TEXT, state TEXT, created REAL, updated REAL, "
                  "run_dir TEXT, config_path TEXT, output_dir TEXT, step INTEGER, max_steps INTEGER, "
                  "distributed_type TEXT, supervisor_pid INTEGER, heartbeat REAL, message TEXT)")
        c.execute("CREATE TABLE attempts (job_id TEXT, n INTEGER, started REAL, ended REAL, pid INTEGER, "
                  "exit_code INTEGER, failure TEXT, resumed_from TEXT, start_step INTEGER, end_step INTEGER, "
                  "gained_checkpoint INTEGER, message TEXT)")
        c.execute("INSERT INTO jobs VALUES ('old-1','old','local','COMPLETED',1,2,?,'c','o',40,40,'FSDP',NULL,NULL,"
                  "'completed')", (str(run_dir),))
        c.execute("INSERT INTO attempts VALUES ('old-1',1,1,2,99,0,'COMPLETED',NULL,0,40,1,NULL)")
    ledger = Ledger.for_home(home)
    job = ledger.get("old-1")
    assert (job.state, job.step, [a.failure for a in job.attempts]) == (JobState.COMPLETED, 40, ["COMPLETED"])
    assert [j.id for j in ledger.jobs()] == ["old-1"] and (home / "ledger.db.0.1").exists()


def test_two_ledger_objects_on_one_file_see_each_others_writes(tmp_path):
    path = tmp_path / "index" / "h.db"
    supervisor, cli = Ledger(path), Ledger(path)
    add(supervisor, "a-1")
    assert cli.get("a-1").state is JobState.PENDING
    cli.update_job("a-1", state=JobState.CANCELLED)
    assert supervisor.get("a-1").state is JobState.CANCELLED


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "index" / "h.db"
    errors: list[BaseException] = []

    def writer(tag: str) -> None:
        ledger = Ledger(path)  # one object per thread, like one per process
        try:
            for i in range(15):
                add(ledger, f"{tag}-{i}")
                ledger.start_attempt(f"{tag}-{i}", 1, pid=i, resumed_from=None, start_step=0)
                ledger.update_job(f"{tag}-{i}", state=JobState.RUNNING, step=i)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    jobs = Ledger(path).jobs()
    assert len(jobs) == 45
    assert all(j.state is JobState.RUNNING and len(j.attempts) == 1 for j in jobs)
    assert {j.step for j in jobs if j.id.startswith("b-")} == set(range(15))

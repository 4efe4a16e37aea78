"""Goodput (issue 20): the account built from recorded events, by hand-checked timelines.

Each case writes the records a job leaves (ledger times, progress records, heartbeat, final check,
SLURM allocation events) with round numbers, and checks every part of the account against the
seconds worked out by hand in the comments. The parts must add up to the wall time.
"""
from __future__ import annotations

import json

import pytest

from orchestrator.states import JobState
from orchestrator.store.goodput import CAUSES, GOODPUT, AttemptFacts, JobFacts, account
from orchestrator.store.goodput_read import ALLOCATIONS, GoodputReader, job_account
from orchestrator.store.ledger import Ledger
from orchestrator.worker import channel


def start(attempt, t, step=0, **kw):
    return {"event": "start", "attempt": attempt, "time": t, "step": step, **kw}


def logs(attempt, times, first_step):
    return [{"event": "log", "attempt": attempt, "time": t, "step": first_step + k} for k, t in enumerate(times)]


def ckpt(attempt, step, started, save_s):
    return {"event": "checkpoint", "attempt": attempt, "step": step, "started": started, "save_s": save_s,
            "time": started + save_s + 0.5}   # committed a little later (background write)


def end(attempt, t, step, state):
    return {"event": "end", "attempt": attempt, "time": t, "step": step, "state": state}


def check_adds_up(acc, wall):
    data = acc.to_json()
    parts = data["goodput_s"] + sum(data["badput_s"].values())
    assert data["wall_s"] == pytest.approx(wall, abs=1e-6)
    assert parts == pytest.approx(wall, rel=0.01, abs=1e-6)
    for a in data["attempts"]:
        assert a["goodput_s"] + sum(a["badput_s"].values()) == pytest.approx(a["wall_s"], abs=1e-6)
    assert sum(a["wall_s"] for a in data["attempts"]) <= data["wall_s"] + 1e-6
    return data


def test_a_clean_run_counts_start_up_saves_eval_final_save_and_check():
    # submit 0; attempt 1 starts at 2, first step begins at 10; steps 1-10 take 1 s each; a save at step 5
    # blocks 1 s (15-16); an evaluation after step 10 takes 2 s (21-23); the final save until the end
    # record (23-25); the final check 26-29; the attempt's end is recorded at 30, the job's at 31.
    recs = [start(1, 10.0, process_start=4.0), *logs(1, [11, 12, 13, 14, 15, 17, 18, 19, 20, 21], 1),
            ckpt(1, 5, 15.0, 1.0),
            {"event": "eval", "attempt": 1, "time": 23.0, "step": 10, "eval_s": 2.0, "metrics": {"eval_loss": 1.0}},
            end(1, 25.0, 10, "completed")]
    a = AttemptFacts(1, started=2.0, ended=30.0, world_size=2, start_step=0, records=recs,
                     final_check={"started": 26.0, "ended": 29.0})
    data = check_adds_up(account(JobFacts(created=0.0, end=31.0, state="COMPLETED", attempts=[a])), 31.0)
    assert data["goodput_s"] == pytest.approx(10.0) and data["fraction"] == pytest.approx(10 / 31, abs=1e-4)
    bad = data["badput_s"]
    assert bad["startup"] == pytest.approx(10.0)       # 0-10: submit, launch, imports, model load
    assert bad["checkpoint"] == pytest.approx(3.0)     # 15-16 blocked, 23-25 final save
    assert bad["eval"] == pytest.approx(2.0) and bad["final_check"] == pytest.approx(3.0)
    assert bad["other"] == pytest.approx(3.0)          # 25-26, 29-30, 30-31
    assert bad["lost"] == 0 and bad["queue"] == 0 and bad["waiting"] == 0
    assert data["gpu_hours"]["total"] == pytest.approx(2 * 31 / 3600, abs=1e-4)
    st = data["attempts"][0]["step_time"]
    assert st["median_s"] == pytest.approx(1.0) and st["slow_steps"] == 0
    assert data["attempts"][0]["startup"] == {"launch_s": 2.0, "init_s": 6.0}   # 2-4 launch, 4-10 in the process


def test_a_kill_after_a_checkpoint_loses_the_redone_steps_and_the_step_in_progress():
    # attempt 1: steps 1-8 at 1 s (11-18), checkpoint at step 4; killed during step 9 (last beat 18.6),
    # found dead at 21. Attempt 2 starts at 23 from step 4: start-up 23-28, restore 28-30, steps 5-10
    # (31-36), final save 36-37, the end 38.
    a1 = AttemptFacts(1, started=2.0, ended=21.0, world_size=2, start_step=0, last_beat=18.6,
                      records=[start(1, 10.0), *logs(1, range(11, 19), 1), ckpt(1, 4, 14.0, 0.0)])
    a2 = AttemptFacts(2, started=23.0, ended=38.0, world_size=2, start_step=4,
                      records=[start(2, 30.0, step=4, restore_s=2.0), *logs(2, range(31, 37), 5),
                               end(2, 37.0, 10, "completed")])
    data = check_adds_up(account(JobFacts(created=0.0, end=38.0, state="COMPLETED", attempts=[a1, a2])), 38.0)
    bad = data["badput_s"]
    assert data["goodput_s"] == pytest.approx(4.0 + 6.0)          # steps 1-4 of attempt 1, 5-10 of attempt 2
    assert bad["lost"] == pytest.approx(4.0 + 0.6)                # steps 5-8 trained twice, and 18-18.6
    assert bad["waiting"] == pytest.approx(2.4 + 2.0)             # detection 18.6-21, backoff 21-23
    assert bad["startup"] == pytest.approx(10.0 + 5.0) and bad["restore"] == pytest.approx(2.0)
    assert bad["checkpoint"] == pytest.approx(1.0) and bad["other"] == pytest.approx(1.0)
    one, two = data["attempts"]
    assert one["steps"] == {"kept": 4, "lost": 4} and two["steps"] == {"kept": 6, "lost": 0}
    assert one["badput_s"]["lost"] == pytest.approx(4.6) and two["badput_s"]["waiting"] == pytest.approx(2.0)


def test_a_slurm_preemption_with_queue_wait_on_both_sides(tmp_path):
    # pending 0-100; attempt 1 (105) trains steps 1-5 (111-115), is preempted: stop save 115-117 (1 s
    # blocked, then the rest of the stop save), ends 118; requeued, pending until 300; attempt 2 (305) resumes
    # from 5 with a 3 s restore, steps 6-10 (313-317), final save to 318, final check 319-321, ends 322.
    a1 = AttemptFacts(1, started=105.0, ended=118.0, world_size=4, start_step=0,
                      records=[start(1, 110.0), *logs(1, range(111, 116), 1), ckpt(1, 5, 115.0, 1.0),
                               end(1, 117.0, 5, "stopped")])
    a2 = AttemptFacts(2, started=305.0, ended=322.0, world_size=4, start_step=5,
                      records=[start(2, 312.0, step=5, restore_s=3.0), *logs(2, range(313, 318), 6),
                               end(2, 318.0, 10, "completed")], final_check={"started": 319.0, "ended": 321.0})
    allocations = [{"event": "submitted", "time": 0.0}, {"event": "started", "time": 100.0},
                   {"event": "started", "time": 300.0}]
    facts = JobFacts(created=0.0, end=322.0, state="COMPLETED", attempts=[a1, a2], allocations=allocations)
    data = check_adds_up(account(facts), 322.0)
    bad = data["badput_s"]
    assert bad["queue"] == pytest.approx(100.0 + 182.0)            # 0-100 and 118-300
    assert bad["startup"] == pytest.approx(10.0 + 4.0) and bad["restore"] == pytest.approx(3.0)
    assert bad["checkpoint"] == pytest.approx(2.0 + 1.0)           # stop save 115-117, final save 317-318
    assert bad["waiting"] == pytest.approx(1.0 + 5.0)              # 117-118 (the attempt ending), 300-305
    assert bad["final_check"] == pytest.approx(2.0) and bad["lost"] == 0
    assert data["goodput_s"] == pytest.approx(10.0)
    assert data["gpu_hours"]["by_cause"]["queue"] == pytest.approx(4 * 282 / 3600, abs=1e-4)


def test_a_resize_counts_each_attempt_at_its_own_world_size():
    # 4 ranks: steps 1-4 at 1 s (6-9), a save at 4 (9-9.5), a lost node at ~10.2, found at 12;
    # 2 ranks from step 4 (attempt 2 at 15): steps 5-8 at 2 s each (22-28), the end 29, ended 30.
    a1 = AttemptFacts(1, started=0.0, ended=12.0, world_size=4, start_step=0, last_beat=10.2,
                      records=[start(1, 5.0), *logs(1, [6, 7, 8, 9], 1), ckpt(1, 4, 9.0, 0.5)])
    a2 = AttemptFacts(2, started=15.0, ended=30.0, world_size=2, start_step=4,
                      records=[start(2, 20.0, step=4), *logs(2, [22, 24, 26, 28], 5), end(2, 29.0, 8, "completed")])
    data = check_adds_up(account(JobFacts(created=0.0, end=30.0, state="COMPLETED", attempts=[a1, a2])), 30.0)
    one, two = data["attempts"]
    assert one["world_size"] == 4 and two["world_size"] == 2
    assert one["gpu_hours"] == pytest.approx(4 * 12 / 3600, abs=1e-4)   # 0-12 at 4 ranks
    assert two["gpu_hours"] == pytest.approx(2 * 18 / 3600, abs=1e-4)   # 12-30 (wait included) at 2
    assert data["gpu_hours"]["total"] == pytest.approx((48 + 36) / 3600, abs=1e-4)
    assert data["gpu_hours"]["goodput"] == pytest.approx((4 * 4 + 8 * 2) / 3600, abs=1e-4)
    assert data["badput_s"]["lost"] == pytest.approx(0.7)               # 9.5-10.2: the step in progress
    assert one["step_time"]["median_s"] == pytest.approx(1.0) and two["step_time"]["median_s"] == pytest.approx(2.0)


def test_slow_steps_and_the_rank_the_others_waited_for():
    times = [11, 12, 13, 14, 18, 19, 20, 21]                 # step 5 took 4 s: slow (> 2 x the 1 s median)
    ranks = [{"rank": 0, "host": "n1", "between_s": {"median": 0.02}, "step_s": {"median": 1.0}},
             {"rank": 1, "host": "n1", "between_s": {"median": 0.03}, "step_s": {"median": 1.0}},
             {"rank": 2, "host": "n2", "between_s": {"median": 0.45}, "step_s": {"median": 1.0}}]
    a = AttemptFacts(1, started=0.0, ended=23.0, world_size=3, records=[start(1, 10.0), *logs(1, times, 1),
                                                                       end(1, 22.0, 8, "completed")], ranks=ranks)
    data = account(JobFacts(created=0.0, end=23.0, state="COMPLETED", attempts=[a])).to_json()
    st = data["attempts"][0]["step_time"]
    assert st["median_s"] == pytest.approx(1.0) and st["slow_steps"] == 1 and st["worst_s"] == pytest.approx(4.0)
    slow = data["attempts"][0]["slowest_rank"]
    assert slow["rank"] == 2 and slow["host"] == "n2" and slow["hosts"] == 2 and slow["others_between_s"] == 0.025


def test_a_failed_job_loses_the_steps_after_its_last_checkpoint_and_a_running_one_counts_them():
    recs = [start(1, 10.0), *logs(1, range(11, 17), 1), ckpt(1, 3, 13.0, 0.0), end(1, 16.5, 6, "failed")]
    failed = account(JobFacts(0.0, 20.0, "FAILED", [AttemptFacts(1, 0.0, 19.0, 1, 0, recs)])).to_json()
    assert failed["goodput_s"] == pytest.approx(3.0) and failed["badput_s"]["lost"] == pytest.approx(3.5)
    running = account(JobFacts(0.0, 17.0, "RUNNING", [AttemptFacts(1, 0.0, None, 1, 0, recs[:-1])])).to_json()
    assert running["goodput_s"] == pytest.approx(7.0) and running["badput_s"]["lost"] == 0   # 10-17, in progress
    queued = account(JobFacts(0.0, 50.0, "PENDING", [], queued_now=True)).to_json()
    assert queued["badput_s"]["queue"] == pytest.approx(50.0) and queued["fraction"] == 0


def test_the_reader_takes_every_record_from_the_run_directory(tmp_path):
    from orchestrator.backends.slurm.allocation import ALLOCATIONS as BACKEND_FILE
    from orchestrator.plan.slurm import SUBMITIT_DIR

    assert ALLOCATIONS == (SUBMITIT_DIR, BACKEND_FILE)
    ledger = Ledger(tmp_path / "ledger.db")
    run = tmp_path / "runs" / "j"
    run.mkdir(parents=True)
    ledger.create_job(job_id="j", name="demo", backend="local", run_dir=str(run), config_path="/c.yaml",
                      output_dir=str(run / "output"))
    ledger.start_attempt("j", 1, pid=None, resumed_from=None, start_step=0)
    t = ledger.get("j").attempts[0].started
    with open(run / "progress.jsonl", "w") as f:
        for rec in [start(1, t + 10, world_size=2), *logs(1, [t + 11, t + 12], 1), end(1, t + 13, 2, "completed")]:
            f.write(json.dumps({**rec, "loss": 1.0}) + "\n")
    adir = run / "attempts" / "1"
    channel.write_json_atomic(adir / "final_check.json", {"started": t + 14, "ended": t + 16, "verified": True})
    channel.write_json_atomic(adir / "steps-rank1.json", {"rank": 1, "host": "h", "between_s": {"median": 0.1}})
    channel.write_json_atomic(adir / "nodes" / "0" / "steps-rank0.json", {"rank": 0, "host": "h",
                                                                         "between_s": {"median": 0.2}})
    job = ledger.get("j")
    reader = GoodputReader(run)
    facts = reader.facts(job, now=t + 20)
    assert [r["event"] for r in facts.attempts[0].records] == ["start", "log", "log", "end"]
    assert "loss" not in facts.attempts[0].records[1]                    # kept slim
    assert facts.attempts[0].final_check["ended"] == t + 16 and [r["rank"] for r in facts.attempts[0].ranks] == [0, 1]
    with open(run / "progress.jsonl", "a") as f:                          # read on from where it was
        f.write(json.dumps({"event": "eval", "attempt": 1, "time": t + 12.5, "step": 2, "eval_s": 0.4}) + "\n")
    assert len(reader.facts(job, now=t + 20).attempts[0].records) == 5
    ledger.update_attempt("j", 1, ended=t + 17, failure="COMPLETED")
    ledger.update_job("j", state=JobState.COMPLETED)
    data = job_account(ledger.get("j")).to_json()
    assert set(data["badput_s"]) == set(CAUSES) and data["goodput_s"] == pytest.approx(2.0)
    assert GOODPUT not in data["badput_s"]


def test_shares_below_the_clocks_resolution_at_todays_epoch_end_instead_of_spinning():
    import math

    t = 1_796_652_671.0
    tick = math.ulp(t)                                    # 2.4e-7 s: the finest step of a float here
    # steps 2-4 logged one tick after step 1, attempt 2 resumes from 2: step 2's share (a third of a tick) is
    # kept, the rest lost; the share cannot move the clock and must be spent, not waited for
    a1 = AttemptFacts(1, started=t - 2, ended=t + 4, world_size=1, start_step=0, last_beat=t + 1,
                      records=[start(1, t - 1), *logs(1, [t], 1), {"event": "log", "attempt": 1, "time": t + tick,
                                                                   "step": 4}])
    a2 = AttemptFacts(2, started=t + 5, ended=t + 9, world_size=1, start_step=2,
                      records=[start(2, t + 6, step=2), *logs(2, [t + 7, t + 8], 3)])
    data = check_adds_up(account(JobFacts(t - 3, t + 10, "COMPLETED", [a1, a2])), 13.0)
    assert data["attempts"][0]["steps"] == {"kept": 2, "lost": 2}

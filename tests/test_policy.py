"""The retry policy as a table: (failure, history, policy) -> retry or stop, wait, and why."""
from __future__ import annotations

import pytest

from orchestrator.config.launch import RetryPolicy
from orchestrator.states import Failure
from orchestrator.supervise.policy import Decision, PastAttempt, decide

POLICY = RetryPolicy(max_restarts=3, backoff_s=5.0, backoff_max_s=300.0, max_no_progress=2, max_preemptions=2)

CODES = {"C": Failure.CRASHED, "K": Failure.KILLED, "L": Failure.WORKER_LOST, "S": Failure.STALLED,
         "T": Failure.COLLECTIVE_TIMEOUT, "P": Failure.PREEMPTED, "U": Failure.USER_ERROR, "O": Failure.OOM,
         "D": Failure.COMPLETED, "X": Failure.CANCELLED}


def history(spec: str) -> list[PastAttempt]:
    """``"C+ P- C+"``: one attempt per word, its failure code and whether it saved a new checkpoint."""
    return [PastAttempt(CODES[w[0]], w[1] == "+") for w in spec.split()]


def run(spec: str, policy: RetryPolicy = POLICY) -> Decision:
    """Decide after the last attempt of ``spec`` (the one that just ended)."""
    past = history(spec)
    return decide(past[-1].failure, past, policy)


# (history, retry?, wait_s, words the reason must contain)
CASES = {
    "completed": ("D+", False, 0, ["completed"]),
    "cancelled": ("C+ X-", False, 0, ["cancelled"]),
    "user error never retried": ("U-", False, 0, ["not retried", "fix the cause"]),
    "user error never retried, even with budget left": ("C+ U-", False, 0, ["not retried"]),
    "OOM never retried, says what to change": ("C+ O-", False, 0, [
        "out of memory", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length"]),
    "first crash: retry after backoff_s": ("C+", True, 5, ["CRASHED", "retry 1/3"]),
    "second: doubled": ("C+ C+", True, 10, ["retry 2/3"]),
    "third: doubled again": ("C+ C+ C+", True, 20, ["retry 3/3"]),
    "fourth: budget used up": ("C+ C+ C+ C+", False, 0, ["restart budget used up", "3 restarts",
                                                         "launch.retry.max_restarts=3"]),
    "killed is transient, its first retry at once": ("K+", True, 0, ["KILLED", "retry 1/3 in 0 s"]),
    "worker lost is transient, its first retry at once": ("L+", True, 0, ["WORKER_LOST", "retry 1/3"]),
    "killed again: backoff as for any second retry": ("K+ K+", True, 10, ["KILLED", "retry 2/3"]),
    "killed after a crash: not the first retry": ("C+ K+", True, 10, ["retry 2/3"]),
    "lost after a preemption: still the first retry": ("P+ L+", True, 0, ["retry 1/3"]),
    "a crash after a kill waits as today": ("K+ C+", True, 10, ["CRASHED", "retry 2/3"]),
    "stalled is transient": ("S+", True, 5, ["STALLED"]),
    "collective timeout is transient": ("T+", True, 5, ["COLLECTIVE_TIMEOUT"]),
    "mixed transient failures share one budget": ("C+ K+ S+ T+", False, 0, ["restart budget used up"]),
    "one attempt without progress: still retried": ("C+ C-", True, 10, ["retry 2/3"]),
    "max_no_progress in a row: stop": ("C- C-", False, 0, ["2 attempts in a row saved no new checkpoint",
                                                           "launch.retry.max_no_progress=2"]),
    "progress resets the no-progress count": ("C- C+ C-", True, 20, ["retry 3/3"]),
    "preempted: resume at once": ("P+", True, 0, ["preempted", "not charged"]),
    "preemptions not charged to the failure budget": ("C+ C+ C+ P+", True, 0, ["preempted"]),
    "nor to the backoff": ("C+ C+ P+ C+", True, 20, ["retry 3/3"]),
    "a failure after preemptions still ends the budget": ("C+ C+ C+ P+ C+", False, 0, ["restart budget used up"]),
    "preemptions up to max_preemptions": ("P+ P+", True, 0, ["preempted"]),
    "preemptions past max_preemptions": ("P+ P+ P+", False, 0, ["preempted 3 times",
                                                               "launch.retry.max_preemptions=2"]),
    "preempted without progress: one more chance": ("P- P-", True, 0, ["preempted"]),
    "preempted without progress, again: stop": ("C- P- P-", False, 0, ["3 attempts in a row saved no new checkpoint"]),
}


@pytest.mark.parametrize("spec, retry, wait, words", CASES.values(), ids=CASES.keys())
def test_decide(spec, retry, wait, words):
    d = run(spec)
    assert (d.retry, d.wait_s) == (retry, wait), d.reason
    for word in words:
        assert word in d.reason


def test_backoff_is_capped_at_backoff_max_s():
    policy = RetryPolicy(max_restarts=10, backoff_s=100.0, backoff_max_s=250.0, max_no_progress=99)
    waits = [run(" ".join(["C+"] * n), policy).wait_s for n in range(1, 6)]
    assert waits == [100.0, 200.0, 250.0, 250.0, 250.0]


def test_zero_restarts_means_no_retry_of_failures_but_preemptions_resume():
    policy = RetryPolicy(max_restarts=0)
    assert run("C+", policy).retry is False
    assert run("P+", policy).retry is True


def test_zero_preemptions_means_a_preemption_ends_the_job():
    assert run("P+", RetryPolicy(max_preemptions=0)).retry is False


def test_oom_is_not_retried_whatever_the_budget():
    assert run("O+", RetryPolicy(max_restarts=100, max_no_progress=100)).retry is False

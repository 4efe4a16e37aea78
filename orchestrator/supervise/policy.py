"""The retry policy: a pure decision from (failure, history, policy) to retry or stop.

Defaults (``launch.retry``): transient failures retry with exponential backoff
within one job-level budget (``max_restarts``), except that the job's first retry after a lost
process (KILLED, WORKER_LOST) starts at once: such a fault says nothing about the job, and
waiting only adds to the recovery time (issue 18.3); user errors never retry; OOM and a full disk
never retry unchanged; graceful stops (preemption) retry at once on a separate budget
(``max_preemptions``); and the job stops after ``max_no_progress`` consecutive
attempts that produced no new verified checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config.launch import RetryPolicy
from ..states import Failure

# Failure classes whose first retry does not wait (PREEMPTED never waits: a graceful stop, its own budget).
NO_FIRST_BACKOFF = frozenset({Failure.KILLED, Failure.WORKER_LOST, Failure.PREEMPTED})

OOM_ADVICE = ("out of memory: retrying unchanged would fail the same way. Lower per_device_train_batch_size "
              "(raise gradient_accumulation_steps to keep the batch), lower max_length, or turn on "
              "fsdp_config.activation_checkpointing / fsdp_config.cpu_offload, then submit the edited config again "
              "(resume reruns the job's plan as it was)")


@dataclass(frozen=True)
class PastAttempt:
    failure: Failure
    gained_checkpoint: bool


@dataclass(frozen=True)
class Decision:
    retry: bool
    wait_s: float
    reason: str


def decide(failure: Failure, history: list[PastAttempt], policy: RetryPolicy) -> Decision:
    """Whether to start another attempt after one ended with ``failure``.

    ``history`` holds every finished attempt of the job, the one just ended last.
    """
    if failure is Failure.COMPLETED:
        return Decision(False, 0.0, "completed")
    if failure is Failure.CANCELLED:
        return Decision(False, 0.0, "cancelled by the user")
    if failure is Failure.USER_ERROR:
        return Decision(False, 0.0, "the job fails before training starts (config, data, model or code): "
                                    "not retried; fix the cause shown and submit again")
    if failure is Failure.OOM:
        return Decision(False, 0.0, OOM_ADVICE)
    if failure is Failure.DISK_FULL:
        return Decision(False, 0.0, "disk full: retrying would fail the same way; free space (or lower "
                                    "save_total_limit), then resume")
    no_progress = 0
    for past in reversed(history):
        if past.gained_checkpoint:
            break
        no_progress += 1
    if failure is Failure.PREEMPTED:
        used = sum(1 for p in history if p.failure is Failure.PREEMPTED)
        if used > policy.max_preemptions:
            return Decision(False, 0.0, f"preempted {used} times (launch.retry.max_preemptions="
                                        f"{policy.max_preemptions})")
        if no_progress >= max(policy.max_no_progress, 1) + 1:
            return Decision(False, 0.0, f"{no_progress} attempts in a row saved no new checkpoint")
        return Decision(True, 0.0, "stopped gracefully (preempted): resuming, not charged to the failure budget")
    failures = sum(1 for p in history if p.failure.transient and p.failure is not Failure.PREEMPTED)
    if failures > policy.max_restarts:
        return Decision(False, 0.0, f"{failure.value}: restart budget used up "
                                    f"({failures - 1} restarts, launch.retry.max_restarts={policy.max_restarts})")
    if no_progress >= policy.max_no_progress:
        return Decision(False, 0.0, f"{failure.value}: {no_progress} attempts in a row saved no new checkpoint "
                                    f"(launch.retry.max_no_progress={policy.max_no_progress})")
    wait = 0.0 if failures == 1 and failure in NO_FIRST_BACKOFF else min(
        policy.backoff_s * (2 ** (failures - 1)), policy.backoff_max_s)
    return Decision(True, wait, f"{failure.value}: retry {failures}/{policy.max_restarts} in {wait:.0f} s")

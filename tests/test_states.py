"""The one table from an attempt's outcome to its failure class, and the job state after it."""
from __future__ import annotations

import pytest

from orchestrator.states import Failure, JobState
from orchestrator.supervise.classify import Outcome, classify, job_state_after
from orchestrator.worker.channel import EXIT_STOPPED


def agent(*exitcodes: int) -> dict:
    """An agent.json record in which rank i ended with ``exitcodes[i]``."""
    return {"outcome": "failed", "exit_code": next((c for c in exitcodes if c > 0), 1),
            "failures": {str(r): {"exitcode": c, "signal": "SIGKILL" if c == -9 else None, "pid": 100 + r,
                                  "message": ""} for r, c in enumerate(exitcodes)}}


def error(etype: str, message: str, phase: str = "train", errno: int | None = None) -> dict:
    """An error-rank<R>.json record."""
    return {"type": etype, "message": message, "phase": phase, "rank": 0, "errno": errno}


CASES = {
    "completed": (Outcome(0, agent=None, worker_state="completed"), Failure.COMPLETED),
    "completed, abort in teardown afterwards": (Outcome(-6, agent=agent(-6), worker_state="completed"),
                                                Failure.COMPLETED),
    "worker says stopped": (Outcome(EXIT_STOPPED, agent=agent(EXIT_STOPPED), worker_state="stopped"),
                            Failure.PREEMPTED),
    "exit 75 without status": (Outcome(EXIT_STOPPED), Failure.PREEMPTED),
    "one rank exited 75": (Outcome(1, agent=agent(EXIT_STOPPED, 1)), Failure.PREEMPTED),
    "CUDA OOM error type": (Outcome(1, agent=agent(1), error=error("OutOfMemoryError", "CUDA out of memory")),
                            Failure.OOM),
    "OOM message in a RuntimeError": (Outcome(1, agent=agent(1), error=error(
        "RuntimeError", "CUDA error: out of memory; tried to allocate 2 GiB")), Failure.OOM),
    "host MemoryError": (Outcome(1, agent=agent(1), error=error("MemoryError", "")), Failure.OOM),
    "OOM during setup is still OOM": (Outcome(1, agent=agent(1), error=error("OutOfMemoryError", "x", "setup")),
                                      Failure.OOM),
    "collective timeout type": (Outcome(1, agent=agent(1), error=error("DistBackendError", "Watchdog caught "
                                "collective operation timed out")), Failure.COLLECTIVE_TIMEOUT),
    "TimeoutError": (Outcome(1, agent=agent(1), error=error("TimeoutError", "")), Failure.COLLECTIVE_TIMEOUT),
    "setup-phase ValueError": (Outcome(1, agent=agent(1), error=error("ValueError", "bad data", "setup")),
                               Failure.USER_ERROR),
    "setup-phase FileNotFoundError": (Outcome(1, agent=agent(1), error=error("FileNotFoundError", "x", "setup")),
                                      Failure.USER_ERROR),
    "train-phase ValueError": (Outcome(1, agent=agent(1), error=error("ValueError", "nan")), Failure.CRASHED),
    "train-phase RuntimeError": (Outcome(1, agent=agent(1), error=error("RuntimeError", "boom")), Failure.CRASHED),
    "setup-phase RuntimeError": (Outcome(1, agent=agent(1), error=error("RuntimeError", "x", "setup")),
                                 Failure.CRASHED),
    "ENOSPC while saving": (Outcome(1, agent=agent(1), error=error("OSError", "[Errno 28] No space left on device",
                                                                     errno=28)), Failure.DISK_FULL),
    "safetensors' disk-full message": (Outcome(1, agent=agent(1), error=error(
        "SafetensorError", "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
        "\"No space left on device\" })")), Failure.DISK_FULL),
    "torch's 'file write failed' with the disk nearly full": (Outcome(1, agent=agent(1), error=error(
        "RuntimeError", "PytorchStreamWriter failed writing file data/3: file write failed"), disk_low=True),
        Failure.DISK_FULL),
    "torch's 'unexpected pos' with the disk nearly full": (Outcome(1, agent=agent(1), error=error(
        "RuntimeError", "[enforce fail at inline_container.cc:672] . unexpected pos 336512 vs 336404"),
        disk_low=True), Failure.DISK_FULL),
    "'file write failed' with room on the disk": (Outcome(1, agent=agent(1), error=error(
        "RuntimeError", "PytorchStreamWriter failed writing file data/3: file write failed")), Failure.CRASHED),
    "no record at all and the disk full": (Outcome(1, agent=agent(1), disk_low=True), Failure.DISK_FULL),
    "ENOSPC during setup": (Outcome(1, agent=agent(1), error=error("OSError", "x", "setup", errno=28)),
                            Failure.DISK_FULL),
    "EIO during setup is retried": (Outcome(1, agent=agent(1), error=error("OSError", "Input/output error",
                                                                           "setup", errno=5)), Failure.CRASHED),
    "ESTALE during setup is retried": (Outcome(1, agent=agent(1), error=error("OSError", "Stale file handle",
                                                                              "setup", errno=116)), Failure.CRASHED),
    "a missing file during setup is not": (Outcome(1, agent=agent(1), error=error(
        "FileNotFoundError", "no such file", "setup", errno=2)), Failure.USER_ERROR),
    "a forbidden file during setup is not": (Outcome(1, agent=agent(1), error=error(
        "PermissionError", "denied", "setup", errno=13)), Failure.USER_ERROR),
    "an OSError without errno during setup (hub loading)": (Outcome(1, agent=agent(1), error=error(
        "OSError", "Can't load tokenizer", "setup")), Failure.USER_ERROR),
    "a reporting integration not installed (set-up)": (Outcome(1, agent=agent(1), error=error(
        "RuntimeError", "WandbCallback requires wandb to be installed. Run `pip install wandb`.", "setup")),
        Failure.USER_ERROR),
    "a package not installed, worded otherwise (set-up)": (Outcome(1, agent=agent(1), error=error(
        "RuntimeError", "liger_kernel is not installed", "setup")), Failure.USER_ERROR),
    "the same words while training are retried": (Outcome(1, agent=agent(1), error=error(
        "RuntimeError", "foo requires bar to be installed", "train")), Failure.CRASHED),
    "rank killed by SIGKILL": (Outcome(1, agent=agent(1, -9)), Failure.KILLED),
    "rank killed by SIGSEGV": (Outcome(1, agent=agent(-11)), Failure.KILLED),
    "agent missing, rc -9": (Outcome(-9), Failure.WORKER_LOST),
    "agent missing, rc 1": (Outcome(1), Failure.WORKER_LOST),
    "agent record, rank exit 1, no error record": (Outcome(1, agent=agent(1)), Failure.WORKER_LOST),
    "agent signalled": (Outcome(143, agent={"outcome": "signalled", "signal": "SIGTERM"}), Failure.WORKER_LOST),
    "stalled wins over the rest": (Outcome(-9, agent=agent(-9), error=error("RuntimeError", "x"), stalled=True),
                                   Failure.STALLED),
    "cancelled wins over everything": (Outcome(EXIT_STOPPED, worker_state="completed", stalled=True,
                                               cancelled=True), Failure.CANCELLED),
    "stopped wins over an error record": (Outcome(EXIT_STOPPED, worker_state="stopped",
                                                  error=error("RuntimeError", "x")), Failure.PREEMPTED),
}


@pytest.mark.parametrize("outcome, want", CASES.values(), ids=CASES.keys())
def test_classify(outcome, want):
    assert classify(outcome) is want


@pytest.mark.parametrize("failure, will_retry, want", [
    (Failure.COMPLETED, False, JobState.COMPLETED),
    (Failure.COMPLETED, True, JobState.COMPLETED),
    (Failure.CANCELLED, True, JobState.CANCELLED),
    (Failure.CRASHED, True, JobState.RESUMING),
    (Failure.PREEMPTED, True, JobState.RESUMING),
    (Failure.CRASHED, False, JobState.FAILED),
    (Failure.OOM, False, JobState.FAILED),
    (Failure.USER_ERROR, False, JobState.FAILED),
])
def test_job_state_after(failure, will_retry, want):
    assert job_state_after(failure, will_retry) is want


def test_terminal_states():
    assert {s for s in JobState if s.is_terminal} == {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}


def test_transient_failures():
    assert {f for f in Failure if f.transient} == {
        Failure.PREEMPTED, Failure.COLLECTIVE_TIMEOUT, Failure.KILLED, Failure.WORKER_LOST, Failure.STALLED,
        Failure.CRASHED}


def test_exit_stopped_matches_the_channel():
    from orchestrator.worker import channel

    assert EXIT_STOPPED == channel.EXIT_STOPPED == 75
    assert channel.WORKER_STOPPED == "stopped" and channel.WORKER_COMPLETED == "completed"

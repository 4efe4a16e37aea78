"""Pieces of ``train_worker.py`` that need neither torch nor transformers.

Where the worker writes (:class:`WorkerEnv`), which checkpoint it resumes from
(:func:`resolve_resume`; checkpoint markers and the completeness test are in
:mod:`orchestrator.worker.checkpoints`, shared with the supervisor), the stop flag set by
signals (:class:`StopFlag`), the per-rank error record (:func:`write_error`) and the
test-only fault injection (:func:`maybe_inject_fault`). Kept free of heavy imports so tests
and the orchestrator can use them cheaply.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import channel
from .checkpoints import TRAINER_STATE, latest_complete_checkpoint, list_checkpoints, read_marker

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class WorkerEnv:
    """Where this attempt writes: from the orchestrator's variables, or ``output_dir`` by hand."""

    progress: Path
    attempt_dir: Path
    attempt: int

    @classmethod
    def from_environ(cls, output_dir: str | os.PathLike, environ=None) -> "WorkerEnv":
        env = os.environ if environ is None else environ
        out = Path(output_dir).absolute()
        run_dir = Path(env[channel.ENV_RUN_DIR]) if env.get(channel.ENV_RUN_DIR) else out
        attempt_dir = Path(env[channel.ENV_ATTEMPT_DIR]) if env.get(channel.ENV_ATTEMPT_DIR) else out
        return cls(run_dir / channel.PROGRESS_FILE, attempt_dir, int(env.get(channel.ENV_ATTEMPT) or 1))

    @property
    def status(self) -> Path:
        return self.attempt_dir / channel.STATUS_FILE

    def error_file(self, rank: int) -> Path:
        return self.attempt_dir / channel.error_file_name(rank)


def resolve_resume(
    output_dir: str | os.PathLike, config_value: str | bool | None, environ=None
) -> tuple[str | None, str]:
    """``(checkpoint or None, why)`` following the precedence below.

    1. ``$ORCHESTRATE_RESUME_FROM``: a path, or ``none`` (start fresh);
    2. ``resume_from_checkpoint`` of the config (a path; ``true`` means "the latest");
    3. the newest complete (marked) checkpoint of ``output_dir``;
    4. by hand, with no markers at all: ``get_last_checkpoint``'s pick if it has ``trainer_state.json``.
    """
    env = os.environ if environ is None else environ
    forced = (env.get(channel.ENV_RESUME_FROM) or "").strip()
    if forced:
        if forced.lower() == channel.RESUME_NONE:
            return None, f"{channel.ENV_RESUME_FROM}=none"
        if not (Path(forced) / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"{channel.ENV_RESUME_FROM}={forced}: not a checkpoint (no {TRAINER_STATE})")
        return forced, channel.ENV_RESUME_FROM
    if isinstance(config_value, str) and config_value.strip().lower() in ("", "false", "none"):
        config_value = None
    if isinstance(config_value, str) and config_value.strip().lower() != "true":
        if not (Path(config_value) / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"resume_from_checkpoint={config_value}: not a checkpoint (no {TRAINER_STATE})")
        return config_value, "resume_from_checkpoint"
    marked = latest_complete_checkpoint(output_dir)
    if marked is not None:
        return str(marked), "latest complete checkpoint"
    ckpts = [path for _, path in list_checkpoints(output_dir)]
    if ckpts and not any(read_marker(c) for c in ckpts):
        last = ckpts[0]  # the newest: what transformers' get_last_checkpoint picks
        if (last / TRAINER_STATE).is_file():
            return str(last), "latest checkpoint (no markers: run by hand)"
    if config_value is True or (isinstance(config_value, str) and config_value.strip().lower() == "true"):
        raise FileNotFoundError(f"resume_from_checkpoint=true but no complete checkpoint in {output_dir}")
    return None, "no checkpoint"


# ---- signals, errors, faults -------------------------------------------------------------

class StopFlag:
    """Set by SIGTERM/SIGUSR1/SIGUSR2; the handler only records the signal."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.installed: list[signal.Signals] = []

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handler(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name

    def install(self, environ=None) -> "StopFlag":
        """SIGTERM always; plus ``$ORCHESTRATE_STOP_SIGNALS`` (the plan's ``launch.stop_signal``),
        or SIGUSR1 and SIGUSR2 when run by hand. NCCL may use SIGUSR1 itself, hence the choice."""
        env = os.environ if environ is None else environ
        names = [n.strip() for n in env.get(channel.ENV_STOP_SIGNALS, "").split(",") if n.strip()]
        extra = [signal.Signals[n] for n in names if n in signal.Signals.__members__]
        self.installed = sorted({signal.SIGTERM, *(extra or STOP_SIGNALS)})
        for sig in self.installed:
            signal.signal(sig, self._handler)
        return self

    def restore_defaults(self) -> None:
        """Give the stop signals their default action back (they end the process)."""
        for sig in self.installed:
            signal.signal(sig, signal.SIG_DFL)


def end_failed_rank(exc: BaseException, stop: StopFlag, fast: bool) -> None:
    """A rank whose attempt failed (its error record written) ends without lingering (issue 18.3).

    The interpreter's teardown of torch and transformers takes seconds, and torchrun waits for it
    before it reports the attempt's end; meanwhile its SIGTERM would only set the stop flag. So the
    stop signals get their default action back, and the rank leaves at once, with the traceback in
    its log and torchrun's error file written, when ``fast`` (nothing waits on atexit hooks) or when
    torchrun already asked it to stop. Otherwise it returns and the caller re-raises.
    """
    stop.restore_defaults()
    if not (fast or stop):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(exc)   # what torchrun's record() would write
    except Exception:  # noqa: BLE001 - the error record (write_error) is what the orchestrator reads
        pass
    traceback.print_exception(type(exc), exc, exc.__traceback__)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(1)


def error_errno(exc: BaseException) -> int | None:
    """The OS error number behind ``exc`` or an exception it was raised from (ENOSPC, EIO, ...)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(getattr(exc, "errno", None), int):
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


def write_error(path: Path, exc: BaseException, rank: int, phase: str, step: int) -> None:
    """This rank's error record (atomic); never raises."""
    try:
        channel.write_json_atomic(path, {
            "rank": rank, "type": type(exc).__name__, "message": str(exc), "phase": phase, "step": step,
            "errno": error_errno(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            "time": time.time(),
        })
    except Exception:  # noqa: BLE001 - reporting must not hide the original error
        pass


def parse_fault(spec: str | None, attempt: int) -> tuple[str, int, int] | None:
    """``hang|crash|exit|oom:RANK:STEP[:always]`` -> ``(kind, rank, step)``; ``None`` if off.

    A fault fires in the first attempt only (so the retry can succeed) unless ``:always``.
    """
    if not spec:
        return None
    parts = spec.strip().split(":")
    always = parts[-1] == "always"
    if always:
        parts = parts[:-1]
    if len(parts) != 3 or parts[0] not in ("hang", "crash", "exit", "oom"):
        raise ValueError(f"{channel.ENV_FAULT}={spec!r}: expected hang|crash|exit|oom:RANK:STEP[:always]")
    if attempt > 1 and not always:
        return None
    return parts[0], int(parts[1]), int(parts[2])


def maybe_inject_fault(fault: tuple[str, int, int] | None, rank: int, step: int) -> None:
    """Test-only: simulate a stuck rank, a crash, a hard death or an out-of-memory error at the start of ``step``."""
    if fault is None or fault[1] != rank or fault[2] != step:
        return
    kind = fault[0]
    if kind == "hang":
        while True:  # the other ranks block in their next collective
            time.sleep(3600)
    if kind == "crash":
        raise RuntimeError(f"injected fault ({channel.ENV_FAULT}): crash on rank {rank} at step {step}")
    if kind == "oom":   # what the allocator raises; a CPU run's stand-in for a real CUDA OOM (bench/acceptance.py)
        import torch

        raise getattr(torch, "OutOfMemoryError", MemoryError)(
            f"CUDA out of memory (injected fault, {channel.ENV_FAULT}, on rank {rank} at step {step})")
    os.kill(os.getpid(), signal.SIGKILL)


# ---- test-only faults inside the save path -------------------------------------------------

SAVE_POINTS = ("start", "model", "optimizer", "rng", "write", "marker", "rotate")


@dataclass(frozen=True)
class SaveFault:
    """``$ORCHESTRATE_SAVE_FAULT``: ``KIND:RANK:STEP:POINT[:SECONDS][:always]``.

    KIND ``kill`` (SIGKILL), ``sleep`` (a slow save: SECONDS) or ``enospc`` (the disk is full)
    at POINT of the save of ``checkpoint-STEP`` on RANK: ``start`` (nothing written yet),
    ``model`` (weights written), ``optimizer`` (optimizer and scheduler written), ``rng``
    (everything but trainer_state.json), ``write`` (the background write of a sharded save begins,
    training goes on), ``marker`` (all written, every rank done, no marker yet),
    ``rotate`` (marker written, older checkpoints being deleted). First attempt only unless ``always``.
    """

    kind: str
    rank: int
    step: int
    point: str
    seconds: float = 0.0

    @classmethod
    def parse(cls, spec: str | None, attempt: int) -> "SaveFault | None":
        if not spec:
            return None
        parts = spec.strip().split(":")
        always = parts[-1] == "always"
        parts = parts[:-1] if always else parts
        ok = len(parts) in (4, 5) and parts[0] in ("kill", "sleep", "enospc") and parts[3] in SAVE_POINTS
        if not ok or not parts[1].isdigit() or not parts[2].isdigit():
            raise ValueError(f"ORCHESTRATE_SAVE_FAULT={spec!r}: expected kill|sleep|enospc:RANK:STEP:POINT"
                             f"[:SECONDS][:always], POINT one of {SAVE_POINTS}")
        if attempt > 1 and not always:
            return None
        return cls(parts[0], int(parts[1]), int(parts[2]), parts[3], float(parts[4]) if len(parts) == 5 else 0.0)

    def fire(self, rank: int, step: int, point: str) -> None:
        """Act if this is the rank, the checkpoint and the point (a no-op everywhere else)."""
        if (rank, step, point) != (self.rank, self.step, self.point):
            return
        if self.kind == "sleep":
            time.sleep(self.seconds)
        elif self.kind == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device (injected at the {point} point of a save)")
        else:
            os.kill(os.getpid(), signal.SIGKILL)

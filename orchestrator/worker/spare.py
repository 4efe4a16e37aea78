"""A spare attempt: the next attempt's processes, started ahead, waiting to be handed the attempt (issue 18.3).

Most of a retry's start-up is Python importing torch, transformers, TRL and datasets in every rank
(about 5 CPU seconds per rank on a small box, far more on a shared filesystem). The local backend
(``orchestrator/backends/spare.py``) therefore starts the next attempt's torchrun while the current one
trains, with ``ORCHESTRATE_SPARE=<owner pid>:<owner start time>`` in its environment. Every rank then
imports what the worker needs and waits here for ``go.json`` in its attempt directory; the supervisor
writes it when the attempt really starts, with what was not known in advance (the checkpoint to
resume from), and the ranks go on as any attempt's would.

Each rank says in its log when its imports are done and, once handed the attempt, how long it waited,
and leaves ``spare-ready-rank<R>`` in the attempt directory when ready (benchmarks wait for it). A spare
whose owner (the supervisor that started it) is gone, or that gets a stop signal before it is handed
anything, exits quietly: nothing of it is an attempt yet.
"""
from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

from . import channel

ENV_SPARE = "ORCHESTRATE_SPARE"
GO_FILE = "go.json"
SPARE_FILE = "spare.json"    # in the attempt directory: the backend's record of the spare (and its hand-over)
READY_PREFIX = "spare-ready-rank"
POLL_S = 0.05
OWNER_CHECK_S = 1.0


# What the worker (or a script under the runner) imports on its way to the first step. Imported by name and
# nothing used from them: only train_worker.py uses TRL's trainer (tests/test_layering.py).
PRELOAD = ("accelerate", "datasets", "torch.distributed.checkpoint", "transformers.trainer",
           "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto")
PRELOAD_TRL = ("trl.trainer.sft_config", "trl.trainer.sft_trainer", "trl.scripts.utils")


def preload(script: bool) -> None:
    """Import the heavy modules now (a script may do without TRL)."""
    for name in PRELOAD:
        importlib.import_module(name)
    for name in PRELOAD_TRL:
        try:
            importlib.import_module(name)
        except ImportError:
            if not script:
                raise


def _owner_alive(spec: str) -> bool:
    try:
        import psutil

        pid, _, start = spec.partition(":")
        return abs(psutil.Process(int(pid)).create_time() - float(start)) < 0.01
    except Exception:  # noqa: BLE001 - gone, reused or unreadable: not our owner any more
        return False


def wait_for_attempt(stop, script: bool = False) -> float | None:
    """In a spare: preload, then block until handed the attempt; returns when (epoch s). Not a spare: ``None``.

    ``stop`` (the worker's stop flag) set before the hand-over, or the owner gone: the process exits (0).
    """
    spec = os.environ.get(ENV_SPARE)
    if not spec:
        return None
    t0 = time.time()
    preload(script)
    adir = Path(os.environ[channel.ENV_ATTEMPT_DIR])
    go, rank = adir / GO_FILE, os.environ.get("RANK", "0")
    ready = time.time()
    print(f"[orchestrate] spare attempt ready: imports done in {ready - t0:.1f} s", file=sys.stderr, flush=True)
    (adir / f"{READY_PREFIX}{rank}").touch()
    checked = time.monotonic()
    while True:
        record = channel.read_json(go)
        if isinstance(record, dict):
            break
        if stop:
            os._exit(0)
        if time.monotonic() - checked >= OWNER_CHECK_S:
            if not _owner_alive(spec):
                os._exit(0)
            checked = time.monotonic()
        time.sleep(POLL_S)
    os.environ.update({k: str(v) for k, v in (record.get("env") or {}).items()})
    print(f"[orchestrate] spare handed the attempt after waiting {time.time() - ready:.1f} s", file=sys.stderr,
          flush=True)
    return float(record.get("time") or time.time())

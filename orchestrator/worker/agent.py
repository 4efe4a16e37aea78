"""torchrun, plus a structured record of how it ended.

``python -m orchestrator.worker.agent <torchrun args>`` runs torchrun's own ``main`` in
this process and writes ``agent.json`` into the attempt directory: which ranks
failed, with which exit code or signal. torchrun only prints that; the supervisor
must not parse prints, so this file is the boundary where it becomes data.
"""
from __future__ import annotations

import os
import sys
import time

from .channel import AGENT_RECORD_FILE, ENV_ATTEMPT_DIR, write_json_atomic


def _failure_record(exc) -> dict:
    failures = {}
    for rank, f in sorted(exc.failures.items()):
        failures[str(rank)] = {
            "exitcode": f.exitcode,
            "signal": f.signal_name() if f.exitcode < 0 else None,
            "pid": f.pid,
            "message": (f.message or "")[:2000] if isinstance(f.message, str) else str(f.message)[:2000],
        }
    return {"outcome": "failed", "failures": failures}


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv``; return an exit status and leave ``agent.json`` behind."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    argv = sys.argv[1:] if argv is None else argv
    attempt_dir = os.environ.get(ENV_ATTEMPT_DIR)
    record: dict = {"pid": os.getpid(), "started": time.time()}
    code = 0
    try:
        torchrun_main(argv)
        record["outcome"] = "succeeded"
    except ChildFailedError as exc:
        record.update(_failure_record(exc))
        codes = [f["exitcode"] for f in record["failures"].values()]
        # Pass a worker's own positive code through (75 = stopped gracefully).
        code = next((c for c in codes if c > 0), 1)
    except SignalException as exc:
        record.update({"outcome": "signalled", "signal": exc.sigval.name})
        code = 128 + int(exc.sigval)
    record["ended"] = time.time()
    record["exit_code"] = code
    if attempt_dir:
        write_json_atomic(os.path.join(attempt_dir, AGENT_RECORD_FILE), record)
    return code


def _leave(code: int) -> None:
    """Exit without the interpreter's teardown of torch (about a second on a small CPU box, on every
    attempt's end): the record is written and torchrun's workers are gone by now (issue 18.3)."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _leave(main())

"""Before a job is called COMPLETED: is its final model the model that was trained? (issues 12, 16)

The worker saves the final weights in ``output_dir`` and records, from the state it saved, a digest of
every tensor and the trained logits (``attempts/<n>/final_model.json``, :mod:`orchestrator.worker.final_record`).
A process of its own (:mod:`orchestrator.worker.export` ``verify``, run with the job's Python where
the supervisor runs: on SLURM inside the allocation, beside the weights) streams the saved
safetensors and compares exactly, in the saved dtype (:mod:`orchestrator.worker.folder_check`).
It holds a few buffers, never the model: extra memory stays well under 2 GiB whatever the size
(the optional logits check loads the model only under ``ORCHESTRATE_FINAL_LOGITS_BUDGET_MB``,
1024 by default).

Three outcomes, written to ``attempts/<n>/final_check.json``: verified; a real mismatch (the job
fails); or the check could not run (the job completes, "final model not verified: <why>").
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..backends.processes import run_module
from ..worker import channel

EXPORT_MODULE = "orchestrator.worker.export"
ENV_LOGITS_BUDGET = "ORCHESTRATE_FINAL_LOGITS_BUDGET_MB"
TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class FinalCheck:
    """The verdict on a job's final model (what ``final_check.json`` holds)."""

    verified: bool
    failed: bool             # a real mismatch: the job fails
    reason: str | None
    folder: str | None
    method: str = "digest"

    @property
    def failure(self) -> str | None:
        """Why the job fails (after "training completed, but "), or None."""
        where = f"in {self.folder} " if self.folder else ""
        return f"the final model {where}is not the trained model: {self.reason}" if self.failed else None

    @property
    def completed(self) -> str | None:
        """The COMPLETED job's message when the model could not be verified (None: plain "completed")."""
        if self.verified or self.failed:
            return None
        return f"COMPLETED, final model not verified: {self.reason}" + (f" (folder: {self.folder})" if self.folder else "")

    @property
    def event(self) -> str:
        if self.verified:
            return f"final model verified ({self.method}: every tensor equals the trained one): {self.folder}"
        return f"final model {'check FAILED' if self.failed else 'not verified'}: {self.reason}"


def verify_final_model(python: str, attempt_dir: str | Path, env: dict | None = None) -> FinalCheck | None:
    """Check the final model of the attempt in ``attempt_dir`` and write ``final_check.json``;
    ``None`` when the worker neither saved a final model nor recorded one (a script of the user's own)."""
    adir, started = Path(attempt_dir), time.time()
    status = channel.read_json(adir / channel.STATUS_FILE) or {}
    folder = status.get("final_model")
    record = adir / channel.FINAL_RECORD_FILE
    peak = None
    if not folder and not record.is_file():
        return None
    if not folder:
        check = FinalCheck(False, True, "the worker saved no final model (no *.safetensors in output_dir)", None)
    else:
        env = dict(env or {})
        budget = env.get(ENV_LOGITS_BUDGET) or os.environ.get(ENV_LOGITS_BUDGET)
        args = ["verify", folder, str(record)] + (["--logits-budget-mb", str(budget)] if budget else [])
        rc, out, err = run_module(python, EXPORT_MODULE, args, timeout_s=TIMEOUT_S, env=env)
        result = last_json(out)
        peak = result.get("peak_rss_mb")
        check = _verdict(result, folder, rc, err)
    channel.write_json_atomic(adir / channel.FINAL_CHECK_FILE, {
        "verified": check.verified, "reason": check.reason, "folder": check.folder, "started": started,
        "ended": time.time(), "method": check.method, "peak_rss_mb": peak})
    return check


def _verdict(result: dict, folder: str, rc: int, err: str) -> FinalCheck:
    verdict, method = result.get("verdict"), result.get("method") or "digest"
    if verdict == "verified":
        return FinalCheck(True, False, None, folder, method)
    if verdict == "mismatch":
        return FinalCheck(False, True, result.get("reason") or "the final model differs", folder, method)
    if verdict == "unverified":
        return FinalCheck(False, False, result.get("reason") or "unknown", folder, method)
    tail = (err.strip().splitlines() or ["no output"])[-1]
    why = f"timed out after {TIMEOUT_S:.0f} s" if rc == 124 else f"exit status {rc}: {tail}"
    return FinalCheck(False, False, f"the check did not finish ({why})", folder, method)


def read_final_check(attempt_dir: str | Path) -> dict | None:
    """An attempt's ``final_check.json``, if it was written."""
    return channel.read_json(Path(attempt_dir) / channel.FINAL_CHECK_FILE)


def last_json(out: str) -> dict:
    """The last line of ``out`` that parses as a JSON object."""
    for line in reversed(out.strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def export_checkpoint(job, plan, step: int | None, out: str | Path) -> dict:
    """Write the weights of ``job``'s complete checkpoint at ``step`` (default: the newest) to ``out`` as a
    Hugging Face folder, checked like a final model. Raises JobError (a mismatch too)."""
    from ..errors import JobError
    from ..worker.checkpoints import newest_complete, verify_checkpoint

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise JobError(f"--out {out}: exists and is not an empty folder (nothing was overwritten)")
    if step is None:
        check = newest_complete(plan.output_dir)[0]
        if check is None:
            raise JobError(f"{job.id}: no complete checkpoint in {plan.output_dir}")
    else:
        check = verify_checkpoint(Path(plan.output_dir) / f"checkpoint-{step}", step)
        if not check.ok:
            raise JobError(f"{job.id}: checkpoint-{step} is not a complete checkpoint: {check.reason}")
    base = str(plan.worker_config.get("model_id") or plan.worker_config.get("model_name_or_path") or "")
    rc, stdout, err = run_module(plan.python, EXPORT_MODULE, ["export", str(check.path), base, str(out)],
                                 timeout_s=TIMEOUT_S, env={"CUDA_VISIBLE_DEVICES": ""})
    result = last_json(stdout)
    if result.get("verdict") not in ("verified", "unverified"):
        tail = (err.strip().splitlines() or ["no output"])[-1]
        raise JobError(f"{job.id}: export of {check.path} failed: {result.get('reason') or tail}")
    return {**result, "checkpoint": str(check.path), "step": check.step}

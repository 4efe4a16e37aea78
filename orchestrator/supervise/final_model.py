"""Before a job is called COMPLETED: its final model must load as a Hugging Face model and reproduce
the trained weights' logits on a fixed input (issue 12).

The worker saves the final weights in ``output_dir`` (config, safetensors, tokenizer, generation
config) and records the logits of the weights it trained, in memory, in
``attempts/<n>/final_logits.json``. A separate process (:mod:`orchestrator.worker.export`, run by the
backends' ``run_module``) loads the folder with ``AutoModelForCausalLM.from_pretrained`` and compares.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..backends.processes import run_module
from ..worker import channel

FINAL_LOGITS = channel.FINAL_LOGITS_FILE
EXPORT_MODULE = "orchestrator.worker.export"


def verify_final_model(python: str, attempt_dir: str | Path, env: dict | None = None) -> tuple[str | None, str | None]:
    """``(the final model's folder, None)`` if it loads and matches, else ``(folder or None, the problem)``;
    ``(None, None)`` when the worker neither saved a final model nor recorded logits."""
    adir = Path(attempt_dir)
    status = channel.read_json(adir / channel.STATUS_FILE) or {}
    folder = status.get("final_model")
    reference = adir / FINAL_LOGITS
    if not folder and not reference.is_file():
        return None, None     # a worker that saves no final model of its own (nothing to check)
    if not folder:
        return None, "the worker saved no final model (no *.safetensors in output_dir)"
    if not reference.is_file():
        return folder, f"the worker recorded no logits of the trained weights ({reference} missing)"
    rc, out, err = run_module(python, EXPORT_MODULE, ["verify", folder, str(reference)], env=env)
    result = _last_json(out)
    if rc == 0 and result.get("ok"):
        return folder, None
    if result.get("missing"):
        return folder, f"the final model in {folder} lacks {', '.join(result['missing'])}"
    if "match" in result:
        return folder, (f"the final model in {folder} does not reproduce the trained weights' logits "
                        f"(largest difference {result.get('max_abs_diff')})")
    tail = (err.strip().splitlines() or ["no output"])[-1]
    return folder, f"the final model in {folder} does not load: {tail}"


def _last_json(out: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return {}


def export_checkpoint(job, plan, step: int | None, out: str | Path) -> dict:
    """Write the weights of ``job``'s complete checkpoint at ``step`` (default: the newest) to ``out`` as a
    Hugging Face folder, checked to load and to reproduce the checkpoint's logits. Raises JobError."""
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
                                 env={"CUDA_VISIBLE_DEVICES": ""})
    result = _last_json(stdout)
    if rc != 0 or not result.get("ok"):
        tail = (err.strip().splitlines() or ["no output"])[-1]
        raise JobError(f"{job.id}: export of {check.path} failed: {result or tail}")
    return {**result, "checkpoint": str(check.path), "step": check.step}

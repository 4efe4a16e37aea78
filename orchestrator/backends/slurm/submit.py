"""Submitting to SLURM: submitit's executor with ``sbatch --parsable``, and ``sbatch --test-only``.

Commands run through :func:`run_command` (an argv list, never a shell string), which tests
replace with a runner that plays back recorded output.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from ...plan import slurm as slurm_plan
from .states import parse_sbatch_parsable

Runner = Callable[..., "tuple[int, str, str]"]
SUPERVISOR_MODULE = "orchestrator.supervise.in_allocation"   # what the allocation's batch step runs
# Words of sbatch errors that mean "SLURM was busy", not "the request is wrong".
TRANSIENT_SUBMIT = ("temporarily", "timed out", "unable to contact", "try again", "connection refused")


def run_command(argv: list[str], input: str | None = None, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run ``argv`` (never through a shell); ``(returncode, stdout, stderr)``, 127 if not installed."""
    try:
        p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    except FileNotFoundError:
        return 127, "", f"{argv[0]}: command not found"
    except subprocess.TimeoutExpired:
        return 124, "", f"{argv[0]}: no answer after {timeout:.0f} s"


def _executor_class():
    from submitit.core import utils as submitit_utils
    from submitit.slurm.slurm import SlurmExecutor

    class ParsableSlurmExecutor(SlurmExecutor):
        """submitit's executor, submitting with ``sbatch --parsable`` and reading the id past any banner."""

        def _make_submission_command(self, submission_file_path: Path) -> list[str]:
            return ["sbatch", "--parsable", str(submission_file_path)]

        @staticmethod
        def _get_job_id_from_submission_command(string) -> str:
            text = string.decode() if isinstance(string, bytes) else string
            try:
                return parse_sbatch_parsable(text)
            except ValueError as exc:
                raise submitit_utils.FailedSubmissionError(str(exc)) from exc

        @classmethod
        def affinity(cls) -> int:
            return 1  # the backend checks for sbatch itself, with a clearer message

    return ParsableSlurmExecutor


def submit_allocation(plan, home: str, exclude: tuple[str, ...] = ()) -> str:
    """Submit the job's allocation through submitit (its batch step runs the supervisor,
    ``python -m orchestrator.supervise.in_allocation``); return the SLURM job id or raise RuntimeError.

    ``exclude``: nodes the job must not get (they failed twice, or were lost).
    """
    from submitit.core.utils import FailedJobError, FailedSubmissionError
    from submitit.helpers import CommandFunction

    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch is not on PATH: submit from a SLURM login node (or start "
                           "scripts/slurm-lab.sh and export SLURM_CONF)")
    params = slurm_plan.executor_parameters(plan)
    if exclude:
        params["additional_parameters"] = {**params["additional_parameters"], "exclude": ",".join(exclude)}
    executor = _executor_class()(slurm_plan.submitit_folder(plan), python=shlex.quote(slurm_plan.job_python(plan)),
                                 max_num_timeout=0)
    executor.update_parameters(**params)
    try:
        command = CommandFunction([slurm_plan.job_python(plan), "-u", "-m", SUPERVISOR_MODULE, str(home), plan.job_id],
                                  cwd=plan.workdir)
        return str(executor.submit(command).job_id)
    except (FailedJobError, FailedSubmissionError, OSError) as exc:
        raise RuntimeError(str(exc).strip() or type(exc).__name__) from exc


def preflight(plan, runner: Runner = run_command) -> list[str]:
    """``sbatch --test-only`` with the exact script: problems SLURM finds (partition, account, QOS,
    time limit, resources) before anything is written or queued."""
    if shutil.which("sbatch") is None:
        return ["launch.backend: slurm, but sbatch is not on PATH: submit from a SLURM login node (or start "
                "scripts/slurm-lab.sh and export SLURM_CONF)"]
    rc, out, err = runner(["sbatch", "--test-only"], input=slurm_plan.sbatch_script(plan))
    if rc == 0:
        return []
    lines = [ln.strip() for ln in (err + "\n" + out).splitlines()
             if "error" in ln.lower() or "failure" in ln.lower()] or [(err or out).strip()]
    return [f"launch.slurm{_key_of(ln)}: SLURM refuses the job: {ln}" for ln in dict.fromkeys(lines)]


# Which setting an sbatch error is about (sbatch says it in prose only; this only names the key).
_ERROR_KEYS = (("partition", "partition"), ("account", "account"), ("qos", "qos"), ("time", "time"),
               ("feature", "constraint"), ("constraint", "constraint"), ("memory", "mem"),
               ("node count", "nodes"), ("node configuration", "nodes"), ("gres", "gpus_per_node"),
               ("cpu", "cpus_per_task"))


def _key_of(line: str) -> str:
    low = line.lower()
    return next((f".{key}" for word, key in _ERROR_KEYS if word in low), "")

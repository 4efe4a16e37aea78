"""Read a seed-format training YAML (plus ``launch:``) and validate all of it at once.

``load_config`` either returns a :class:`JobConfig` or raises :class:`ConfigError`
carrying *every* problem found, each prefixed with its key path. It creates and
changes nothing on disk.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from .checkpoint import parse_checkpoint
from .errors import ConfigError
from .integrations import check_report_to
from .launch import LaunchSettings, parse_launch
from .overrides import Override, apply_overrides
from .renames import FSDP1_ONLY_KEYS, translate

DATASET_FILE = "train_dataset.json"

# Range checks on the training keys users get wrong most: key -> (predicate, description).
_RANGES = {
    "learning_rate": (lambda v: v > 0 and math.isfinite(v), "> 0"),
    "per_device_train_batch_size": (lambda v: v >= 1, ">= 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (use epochs) or >= 1"),
    "num_train_epochs": (lambda v: v > 0, "> 0"),
    "logging_steps": (lambda v: v > 0, "> 0"),
    "save_steps": (lambda v: v > 0, "> 0"),
    "eval_steps": (lambda v: v is None or v > 0, "> 0"),
    "warmup_steps": (lambda v: v >= 0, ">= 0 (steps, or a ratio below 1)"),
    "max_length": (lambda v: v is None or v >= 1, ">= 1"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "save_total_limit": (lambda v: v is None or v >= 1, ">= 1"),
    "dataloader_num_workers": (lambda v: v >= 0, ">= 0"),
}


@dataclass(frozen=True)
class JobConfig:
    """A validated config: what the worker gets, what the orchestrator keeps."""

    source: Path
    training: dict[str, Any]      # worker keys (script args + SFTConfig), translated; paths absolute
    launch: LaunchSettings
    notices: tuple[str, ...] = field(default=())

    @property
    def fsdp_enabled(self) -> bool:
        return bool(self.training.get("fsdp"))

    @property
    def name(self) -> str:
        return self.launch.name or self.source.stem


# Reads the data and the model as the worker will: (training keys) -> (notices, problems). The plan layer
# passes :func:`orchestrator.plan.inputs.inspect_inputs`; the config layer itself reads no data or model.
InputCheck = Callable[[dict[str, Any]], tuple[list[str], list[str]]]


def load_config(path: str | os.PathLike, cwd: str | os.PathLike | None = None, script: str | None = None,
                overrides: Sequence[Override] = (), inspect: InputCheck | None = None) -> JobConfig:
    """Read and validate ``path``. Relative paths in it resolve against ``cwd``, as torchrun would.

    ``script`` (``submit --script``) replaces ``launch.script``: the user's own training script runs
    instead of ``train_worker.py``; keys the schema does not know are then left to it (one notice).
    ``overrides`` (``KEY=VALUE`` on the command line, :mod:`.overrides`) are set before validation.
    ``inspect`` reads the data and the model (``validate``/``submit`` pass it); its problems join the rest.
    The training keys are also built into the real ``SFTConfig`` (:mod:`.training_args`) once their names,
    types and ranges are right.
    """
    source = Path(path)
    cwd = Path(cwd or os.getcwd())
    raw, override_problems = apply_overrides(_read_yaml(source), list(overrides))
    launch_raw = raw.pop("launch", None)
    launch, problems = parse_launch(launch_raw)
    problems = override_problems + problems
    if script:
        launch = dataclasses.replace(launch, script=script)
    if launch.script:
        launch, script_problems = _resolve_script(launch, cwd)
        problems += script_problems
    own = bool(launch.script)
    training, notices, rename_problems = translate(raw, own_script=own)
    problems += rename_problems
    # launch.checkpoint is checked against the training keys it may contradict (save_steps)
    checkpoint, ckpt_problems = parse_checkpoint(launch_raw.get("checkpoint") if isinstance(launch_raw, dict)
                                                 else None, training)
    launch = dataclasses.replace(launch, checkpoint=checkpoint)
    problems += ckpt_problems
    training, type_notices, type_problems = _check_keys(training, leave_unknown=own)
    notices += type_notices
    problems += type_problems
    range_problems = _check_ranges(training)
    problems += range_problems
    if not own:   # model_id/dataset_path are train_worker.py's arguments; a script has its own
        problems += _check_required(training)
    training, path_problems = _resolve_paths(training, cwd, own_script=own)
    problems += path_problems
    problems += _check_dtype(training)
    problems += check_report_to(training.get("report_to"))
    fsdp_notices, fsdp_problems = _check_fsdp(training)
    notices += fsdp_notices
    problems += fsdp_problems
    settled = not (rename_problems or type_problems or range_problems or fsdp_problems
                   or any(p.startswith("fsdp_config:") for p in path_problems))
    if not own and settled:   # else SFTConfig would only repeat what is already said
        from .training_args import training_args_problems

        problems += training_args_problems(training)
    if inspect is not None and not own:
        input_notices, input_problems = inspect(training)
        notices += input_notices
        problems += input_problems
    if problems:
        raise ConfigError(str(source), problems, notices)
    return JobConfig(source=source.absolute(), training=training, launch=launch, notices=tuple(notices))


def _read_yaml(source: Path) -> dict:
    if not source.is_file():
        raise ConfigError(str(source), [f"{source}: no such config file"])
    try:
        data = yaml.safe_load(source.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(str(source), [f"{source}: not valid YAML{where}: {getattr(exc, 'problem', exc)}"])
    if not isinstance(data, dict):
        raise ConfigError(str(source), [f"{source}: expected a mapping of key: value at the top level"])
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(str(source), [f"{k!r}: keys must be strings" for k in bad])
    return data


def _resolve_script(launch: LaunchSettings, cwd: Path) -> tuple[LaunchSettings, list[str]]:
    p = (cwd / Path(launch.script).expanduser()).absolute()
    if not p.is_file():
        return launch, [f"launch.script: {p} is not a file"]
    return dataclasses.replace(launch, script=str(p)), []


def _check_keys(training: dict, leave_unknown: bool = False) -> tuple[dict, list[str], list[str]]:
    """Types of known keys; unknown keys are problems, or (``leave_unknown``: a user's script) its own."""
    from .schema import check_value, closest, known_keys

    known = known_keys()
    out, notices, problems = {}, [], []
    left = [k for k in training if k not in known] if leave_unknown else []
    if left:
        notices.append(f"left to the script (not TrainingArguments/SFTConfig keys): {', '.join(left)}")
    for key, value in training.items():
        if key in left:
            out[key] = value
            continue
        if key not in known:
            hint = closest(key, known)
            problems.append(f"{key}: unknown key" + (f" (did you mean '{hint}'?)" if hint else ""))
            continue
        value, notice, problem = check_value(key, value, known[key])
        if problem:
            problems.append(problem)
        if notice:
            notices.append(notice)
        out[key] = value
    return out, notices, problems


def _check_ranges(training: dict) -> list[str]:
    problems = []
    for key, (ok, want) in _RANGES.items():
        value = training.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
            problems.append(f"{key}: must be {want}, got {value!r}")
    return problems


def _check_required(training: dict) -> list[str]:
    return [f"{key}: required (the worker's script argument)" for key in ("model_id", "dataset_path")
            if not training.get(key)]


DTYPES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16")


def _check_dtype(training: dict) -> list[str]:
    dtype = training.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        return [f"dtype: expected one of {list(DTYPES)}, got {dtype!r}"]
    return []


def _looks_like_path(value: str, cwd: Path) -> bool:
    return value.startswith((".", "/", "~")) or (cwd / value).exists()


def _resolve_paths(training: dict, cwd: Path, own_script: bool = False) -> tuple[dict, list[str]]:
    """Make local paths absolute (the job may run elsewhere) and check they exist (a user's script reads
    its model and data its own way: only output_dir and resume_from_checkpoint are ours then)."""
    out, problems = dict(training), []
    model = training.get("model_id") if not own_script else None
    if isinstance(model, str) and model and _looks_like_path(model, cwd):
        p = (cwd / Path(model).expanduser()).absolute()
        out["model_id"] = str(p)
        if not p.is_dir():
            problems.append(f"model_id: model folder {p} does not exist")
        elif not (p / "config.json").is_file():
            problems.append(f"model_id: {p} has no config.json (not a saved model folder)")
    data = training.get("dataset_path") if not own_script else None
    if isinstance(data, str) and data:
        p = (cwd / Path(data).expanduser()).absolute()
        out["dataset_path"] = str(p)
        if not p.exists():   # what a folder or file holds is read by the input check (worker/data.py)
            problems.append(f"dataset_path: {p} does not exist (a folder with {DATASET_FILE} or train.jsonl, a "
                            "datasets save_to_disk folder, or a .json/.jsonl/.parquet file)")
    fsdp_file = training.get("fsdp_config")
    if isinstance(fsdp_file, str) and fsdp_file.strip() and not fsdp_file.lstrip().startswith("{"):
        p = (cwd / Path(fsdp_file).expanduser()).absolute()   # transformers reads it where the ranks run
        out["fsdp_config"] = str(p)
        if not p.is_file():
            problems.append(f"fsdp_config: {p} does not exist (a JSON file of FSDP settings, or a mapping)")
    for key in ("output_dir", "resume_from_checkpoint"):
        value = training.get(key)
        if isinstance(value, str) and value:
            out[key] = str((cwd / Path(value).expanduser()).absolute())
    out_dir = out.get("output_dir")
    if isinstance(out_dir, str) and out_dir and Path(out_dir).exists() and not Path(out_dir).is_dir():
        problems.append(f"output_dir: {out_dir} exists and is not a folder (checkpoints and the model go there)")
    return out, problems


def _check_fsdp(training: dict) -> tuple[list[str], list[str]]:
    """FSDP settings that contradict each other or what accelerate accepts."""
    notices, problems = [], []
    fsdp_on = bool(training.get("fsdp"))
    fc = training.get("fsdp_config")
    if fc is not None and not isinstance(fc, dict):
        return notices, problems  # a JSON file path (accelerate reads it), or a type problem already reported
    fc = fc or {}
    if fc and not fsdp_on:
        problems.append("fsdp_config: set, but fsdp is off; add 'fsdp: true' or remove fsdp_config")
    if fsdp_on and training.get("deepspeed"):
        problems.append("fsdp: FSDP and deepspeed are both set; choose one")
    version = fc.get("version", 2)
    if version not in (1, 2, "1", "2"):
        problems.append(f"fsdp_config.version: expected 1 or 2, got {version!r}")
    version = int(version) if str(version) in ("1", "2") else 2
    ckpt = str(fc.get("activation_checkpointing", "false")).lower() == "true"
    if fsdp_on and ckpt:
        # transformers 5 reads activation_checkpointing, falling back to its deprecated alias
        # gradient_checkpointing, whose SFTConfig default is True: unset means on (Trainer refuses that).
        key = next((k for k in ("activation_checkpointing", "gradient_checkpointing")
                    if training.get(k) is not None), None)
        if key is None:
            training["activation_checkpointing"] = False
            notices.append("activation_checkpointing: set to false (TRL turns it on by default; "
                           "fsdp_config.activation_checkpointing does the checkpointing under FSDP)")
        elif training[key]:
            problems.append(f"{key}: true together with fsdp_config.activation_checkpointing: true; "
                            "transformers refuses both, keep fsdp_config.activation_checkpointing")
    sdt = fc.get("state_dict_type")
    if sdt is not None and sdt not in ("FULL_STATE_DICT", "SHARDED_STATE_DICT", "LOCAL_STATE_DICT"):
        problems.append(f"fsdp_config.state_dict_type: expected FULL_STATE_DICT or SHARDED_STATE_DICT, got {sdt!r}")
    awp = fc.get("auto_wrap_policy")
    if awp is not None and awp not in ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"):
        problems.append(f"fsdp_config.auto_wrap_policy: expected TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP or "
                        f"NO_WRAP, got {awp!r}")
    if version == 1:
        sync = str(fc.get("sync_module_states", "true")).lower()
        cpu_ram = str(fc.get("cpu_ram_efficient_loading", "true")).lower()
        if fsdp_on and sync == "false" and cpu_ram == "true":
            problems.append("fsdp_config.sync_module_states: false, but RAM-efficient loading "
                            "(FSDP_CPU_RAM_EFFICIENT_LOADING) needs it true (accelerate's rule)")
    elif fsdp_on:
        ignored = [k for k in FSDP1_ONLY_KEYS if k in fc]
        if ignored:
            notices.append(f"fsdp_config: {', '.join(ignored)} only apply to FSDP1 and are ignored under FSDP2")
    return notices, problems

"""Builders shared by the unit tests: demo stand-ins, configs, fake checkpoints, jobs.

Plain functions, no fixtures (``tests/conftest.py`` belongs to another file owner);
each test file wraps what it needs in its own fixtures.
"""
from __future__ import annotations

import json
import struct
import textwrap
from pathlib import Path

from orchestrator.config import JobConfig
from orchestrator.config.launch import LaunchSettings
from orchestrator.plan.inputs import read_model_shape
from orchestrator.worker import channel

REPO = Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPO / "configs"
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"

CHAT_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

# The minimal valid config used as a base by the config tests (paths relative to the workdir).
BASE_YAML = """\
model_id: .demo/model
dataset_path: .demo/data
max_steps: 10
"""


def shipped_configs() -> list[Path]:
    """Every config in ``configs/``: new files are covered without touching the tests."""
    return sorted([*CONFIGS_DIR.glob("*.yaml"), *CONFIGS_DIR.glob("*.yml")])


def make_demo_workdir(root: Path) -> Path:
    """Minimal stand-ins for what ``orchestrate demo prepare`` builds: ``.demo/model`` and ``.demo/data``."""
    model = root / ".demo" / "model"
    data = root / ".demo" / "data"
    model.mkdir(parents=True)
    data.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (data / "train_dataset.json").write_text(json.dumps(CHAT_ROW) + "\n")
    return root


def fake_hub_cache(root: Path, configs: dict[str, dict]) -> Path:
    """A Hugging Face hub cache holding only ``config.json`` of each ``{repo_id: config}`` (as after
    ``hf download REPO config.json``): what validation needs to find a Hub id offline. Point HF_HUB_CACHE at it."""
    for repo_id, config in configs.items():
        repo = root / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
        (snapshot / "config.json").write_text(json.dumps(config))
    return root


def model_of(cfg: JobConfig) -> tuple:
    """What ``make_plan(model=...)`` gets from the loader for ``cfg`` (the plan itself reads nothing)."""
    return read_model_shape(cfg.training.get("model_id"))


def write_config(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def job_config(training: dict | None = None, source: str = "/cfg/test.yaml", **launch) -> JobConfig:
    """A JobConfig built directly (no YAML, no TRL import) for pure planning tests."""
    base = {"model_id": "/models/m", "dataset_path": "/data/d", "max_steps": 10}
    return JobConfig(source=Path(source), training={**base, **(training or {})}, launch=LaunchSettings(**launch))


def safetensors_bytes(tensors: dict[str, bytes], metadata: dict | None = None) -> bytes:
    """A valid safetensors file by hand: 8-byte LE header length, JSON header with data_offsets, data."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    data, start = b"", 0
    for name, raw in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(raw)], "data_offsets": [start, start + len(raw)]}
        data += raw
        start += len(raw)
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def make_checkpoint(output_dir: Path, step: int, *, marker: bool = True, marker_step: int | None = None,
                    state_step: int | None = None, weights: bytes | None = None) -> Path:
    """A ``checkpoint-<step>`` folder as the worker leaves it: weights, trainer_state.json, completion marker."""
    path = Path(output_dir) / f"checkpoint-{step}"
    path.mkdir(parents=True)
    weights = safetensors_bytes({"w": bytes(range(16))}) if weights is None else weights
    (path / "model.safetensors").write_bytes(weights)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step if state_step is None else state_step}))
    if marker:
        files = {name: (path / name).stat().st_size for name in ("model.safetensors", "trainer_state.json")}
        channel.write_json_atomic(path / channel.CHECKPOINT_MARKER,
                                  {"step": step if marker_step is None else marker_step, "files": files})
    return path

"""The fast defaults (orchestrator/plan/performance.py) as the plan applies them, their switches, and the dry-run display.

Pure planning: no torch, no processes. Each default is checked on, off through ``launch.performance``,
and overridden by an explicit training key.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import job_config, model_of

from orchestrator.config import ConfigError
from orchestrator.config.launch import parse_launch
from orchestrator.config.performance import PerformanceSettings, parse_performance
from orchestrator.dashboard.plan_view import describe_plan
from orchestrator.plan import LaunchPlan, make_plan
from orchestrator.plan.performance import VARLEN
from orchestrator.plan.topology import Topology

CPU = Topology(gpus=0, cpus=8)
H200 = Topology(gpus=1, cpus=16, gpu_memory_gib=139.8)
TINYLLAMA_CONFIG = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                    "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000}
BENCH_1B = {"max_length": 2048, "per_device_train_batch_size": 8, "bf16": True, "dtype": "bfloat16", "fsdp": True}


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "tinyllama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINYLLAMA_CONFIG))
    return d


def plan(training=None, topo=CPU, performance=None, **launch):
    if performance is not None:
        launch["performance"] = PerformanceSettings(**performance)
    cfg = job_config(training, **launch)
    return make_plan(cfg, topo, job_id="job-0101-abcdef", home=Path("/h"), python="/usr/bin/python3",
                     worker_script="/opt/train_worker.py", workdir="/work", model=model_of(cfg))


def choices(p: LaunchPlan) -> dict:
    return {c["name"]: (c["value"], c["source"]) for c in p.performance["choices"]}


# --- launch.performance parsing ----------------------------------------------------------------------

def test_parse_defaults_and_values():
    assert parse_performance(None) == (PerformanceSettings(), [])
    s, problems = parse_performance({"packing": False, "liger": True, "attention": "sdpa", "gpu_memory_gib": 80,
                                     "safety_margin": 0.2})
    assert problems == [] and (s.packing, s.liger, s.attention, s.gpu_memory_gib, s.safety_margin) == (
        False, True, "sdpa", 80.0, 0.2)


def test_parse_reports_every_problem_with_its_path():
    _, problems = parse_performance({"packng": False, "compile": "yes", "gpu_memory_gib": -1, "safety_margin": 2})
    assert problems == [
        "launch.performance.packng: unknown key (did you mean 'packing'?)",
        "launch.performance.compile: expected auto, true or false, got 'yes'",
        "launch.performance.gpu_memory_gib: expected 'auto' or a number of GiB > 0, got -1",
        "launch.performance.safety_margin: expected a fraction in [0, 0.9), got 2",
    ]
    settings, problems = parse_launch({"performance": {"fused_adamw": False}})
    assert problems == [] and settings.performance.fused_adamw is False
    assert parse_launch({"performance": [1]})[1] == ["launch.performance: expected a mapping, got list"]


# --- the defaults -----------------------------------------------------------------------------------

def test_cpu_defaults():
    p = plan()
    wc = p.worker_config
    assert (wc["packing"], wc["attn_implementation"], wc["optim"], wc["activation_checkpointing"]) == (
        True, VARLEN, "adamw_torch_fused", False)
    assert "use_liger_kernel" not in wc and "torch_compile" not in wc
    c = choices(p)
    assert c["packing"] == (True, "default") and c["compile"] == (False, "default")
    assert c["liger"] == (False, "default") and c["activation_checkpointing"] == (False, "default")


def test_h200_1b_fits_without_checkpointing(model_dir):
    p = plan({**BENCH_1B, "model_id": str(model_dir)}, topo=H200)
    wc = p.worker_config
    assert wc["activation_checkpointing"] is False and "activation_checkpointing" not in wc.get("fsdp_config", {})
    mem = p.performance["memory"]
    assert mem["verdict"].startswith("fits:") and mem["params"] == 1_100_048_384
    assert 30 < mem["estimate_gib"]["peak"] < 60


def test_small_gpu_turns_fsdp_checkpointing_on(model_dir):
    p = plan({**BENCH_1B, "model_id": str(model_dir), "per_device_train_batch_size": 2},
             topo=Topology(1, 16, gpu_memory_gib=24.0))
    assert p.worker_config["fsdp_config"]["activation_checkpointing"] is True
    assert p.worker_config["activation_checkpointing"] is False   # FSDP's own, not the Trainer's
    assert choices(p)["activation_checkpointing"] == (True, "default")


def test_micro_batch_shrinks_with_gradient_accumulation(model_dir):
    p = plan({**BENCH_1B, "model_id": str(model_dir), "gradient_accumulation_steps": 2},
             topo=Topology(1, 16, gpu_memory_gib=40.0))
    wc = p.worker_config
    assert (wc["per_device_train_batch_size"], wc["gradient_accumulation_steps"]) == (4, 4)
    assert any(n.startswith("per_device_train_batch_size: 8 -> 4") for n in p.notices)
    p = plan({**BENCH_1B, "model_id": str(model_dir)}, topo=Topology(1, 16, gpu_memory_gib=40.0),
             performance={"micro_batch": False})
    assert p.worker_config["per_device_train_batch_size"] == 8 and choices(p)["activation_checkpointing"][0]


def test_cannot_fit_is_a_config_error_before_anything_starts(model_dir):
    with pytest.raises(ConfigError) as info:
        plan({**BENCH_1B, "model_id": str(model_dir), "fsdp": False}, topo=Topology(1, 16, gpu_memory_gib=8.0))
    (problem,) = info.value.problems
    assert problem.startswith("memory: cannot fit: at best") and "GiB usable" in problem


def test_unknown_model_keeps_checkpointing_on_gpu():
    p = plan({"bf16": True}, topo=H200)                       # /models/m has no config.json
    assert p.worker_config["activation_checkpointing"] is True
    assert "no memory estimate" in dict((c["name"], c["why"]) for c in p.performance["choices"])[
        "activation_checkpointing"]


def test_liger_auto_follows_the_installed_package():
    assert plan(topo=Topology(1, 8, gpu_memory_gib=80, liger_installed=True)).worker_config["use_liger_kernel"]
    assert "use_liger_kernel" not in plan(topo=Topology(1, 8, gpu_memory_gib=80)).worker_config
    with pytest.raises(ConfigError) as info:
        plan(performance={"liger": True})
    assert info.value.problems == ["launch.performance.liger: true needs a CUDA plan (Liger's kernels are Triton)"]


# --- each default switched off, and explicit keys win -----------------------------------------------------

@pytest.mark.parametrize("switch, key, value", [
    ("packing", "packing", None),
    ("fused_adamw", "optim", "adamw_torch"),
    ("compile", "torch_compile", True),
    ("activation_checkpointing", "activation_checkpointing", True),
])
def test_launch_performance_switches(switch, key, value):
    flip = {"packing": False, "fused_adamw": False, "compile": True, "activation_checkpointing": True}[switch]
    p = plan(performance={switch: flip})
    assert p.worker_config.get(key) == value
    assert choices(p)[switch][1] == "launch.performance"
    if switch == "packing":
        assert "attn_implementation" not in p.worker_config   # padded rows: plain SDPA


def test_attention_switch():
    assert plan(performance={"attention": "sdpa"}).worker_config["attn_implementation"] == "sdpa"


@pytest.mark.parametrize("training, key, want", [
    ({"packing": False}, "packing", False),
    ({"optim": "adamw_torch"}, "optim", "adamw_torch"),
    ({"gradient_checkpointing": True}, "gradient_checkpointing", True),
    ({"torch_compile": True}, "torch_compile", True),
    ({"use_liger_kernel": False}, "use_liger_kernel", False),
    ({"attn_implementation": "eager"}, "attn_implementation", "eager"),
])
def test_explicit_training_keys_win(training, key, want):
    p = plan(training, performance={"packing": True, "fused_adamw": True, "compile": False, "liger": False})
    assert p.worker_config[key] == want
    name = {"gradient_checkpointing": "activation_checkpointing", "optim": "fused_adamw", "torch_compile": "compile",
            "use_liger_kernel": "liger", "attn_implementation": "attention"}.get(key, key)
    assert choices(p)[name][1] == "config"


def test_seed_config_keeps_its_explicit_choices():
    p = plan({"optim": "adamw_torch", "gradient_checkpointing": True, "bf16": True}, topo=H200)
    wc = p.worker_config
    assert wc["optim"] == "adamw_torch" and wc["gradient_checkpointing"] is True
    assert "activation_checkpointing" not in wc and wc["packing"] is True  # packing was not set: default on


# --- the dry-run display and the plan record -----------------------------------------------------------

def test_dry_run_shows_every_choice_and_the_estimate(model_dir):
    p = plan({**BENCH_1B, "model_id": str(model_dir)}, topo=H200)
    text = describe_plan(p)
    section = text[text.index("performance     "):]
    for name in ("packing", "attention", "fused_adamw", "liger", "compile", "activation_checkpointing",
                 "cpu_offload", "micro_batch"):
        assert f"\n  {name} " in section
    assert "  estimate GiB    weights 4.1, grads 4.1, optimizer 8.2" in section
    assert "  verdict         fits:" in section
    assert LaunchPlan.from_dict(json.loads(p.to_json())) == p

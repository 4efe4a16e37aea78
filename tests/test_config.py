"""Config validation: every problem at once with its key path, seed-era renames, the CLI contract,
and every shipped config in ``configs/``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BASE_YAML, REPO, fake_hub_cache, make_demo_workdir, shipped_configs, write_config

from orchestrator.config import ConfigError, load_config
from orchestrator.plan.prepare import prepare
from orchestrator.plan.topology import Topology


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return make_demo_workdir(tmp_path / "work")


def load(workdir: Path, text: str, base: str = BASE_YAML, inspect=None):
    """Load ``base`` + ``text`` from a config file in ``workdir``; relative paths resolve there. ``inspect``:
    the input check validate passes (plan.inputs.inspect_inputs: reads the data and the model)."""
    return load_config(write_config(workdir / "job.yaml", base + text), cwd=workdir, inspect=inspect)


def problems_of(workdir: Path, text: str, base: str = BASE_YAML, inspect=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(workdir, text, base, inspect)
    return info.value.problems


# --- one test per error kind -------------------------------------------------------------------

def test_base_config_is_valid(workdir):
    cfg = load(workdir, "")
    assert cfg.training["model_id"] == str(workdir / ".demo" / "model")
    assert cfg.training["dataset_path"] == str(workdir / ".demo" / "data")
    assert cfg.notices == ()


def test_unknown_key_names_the_closest_valid_key(workdir):
    assert problems_of(workdir, "learning_rat: 0.1\n") == ["learning_rat: unknown key (did you mean 'learning_rate'?)"]


def test_unknown_key_without_a_close_match_has_no_hint(workdir):
    assert problems_of(workdir, "zzqqxx: 1\n") == ["zzqqxx: unknown key"]


@pytest.mark.parametrize("line, key", [
    ("per_device_train_batch_size: eight\n", "per_device_train_batch_size"),
    ("bf16: 3\n", "bf16"),
    ("max_steps: 2.5\n", "max_steps"),
    ("learning_rate: fast\n", "learning_rate"),
    ("fsdp_config: [1, 2]\n", "fsdp_config"),
])
def test_wrong_type(workdir, line, key):
    (problem,) = problems_of(workdir, line)
    assert problem.startswith(f"{key}: expected ")


@pytest.mark.parametrize("line, message", [
    ("learning_rate: -1.0\n", "learning_rate: must be > 0, got -1.0"),
    ("learning_rate: .nan\n", "learning_rate: must be > 0, got nan"),
    ("gradient_accumulation_steps: 0\n", "gradient_accumulation_steps: must be >= 1, got 0"),
    ("warmup_steps: -3\n", "warmup_steps: must be >= 0 (steps, or a ratio below 1), got -3"),
    ("save_total_limit: 0\n", "save_total_limit: must be >= 1, got 0"),
])
def test_range(workdir, line, message):
    assert problems_of(workdir, line) == [message]


def test_max_steps_zero_is_out_of_range(workdir):
    assert problems_of(workdir, "", base=BASE_YAML.replace("max_steps: 10", "max_steps: 0")) == [
        "max_steps: must be -1 (use epochs) or >= 1, got 0"]


def test_missing_data_set_file(workdir):
    from orchestrator.plan.inputs import inspect_inputs

    (workdir / "empty").mkdir()
    base = BASE_YAML.replace(".demo/data", "./empty")
    assert problems_of(workdir, "", base, inspect=inspect_inputs) == [
        f"dataset_path: {workdir / 'empty'} holds no training data: expected one of train_dataset.json, "
        "train_dataset.jsonl, train.jsonl, train.json, train.parquet there, a datasets save_to_disk folder, or "
        "dataset_path naming a .json/.jsonl/.parquet file"]


def test_missing_data_set_folder(workdir):
    base = BASE_YAML.replace(".demo/data", "./nodata")
    assert problems_of(workdir, "", base) == [
        f"dataset_path: {workdir / 'nodata'} does not exist (a folder with train_dataset.json or train.jsonl, a "
        "datasets save_to_disk folder, or a .json/.jsonl/.parquet file)"]


def test_missing_model_folder(workdir):
    base = BASE_YAML.replace(".demo/model", "./nomodel")
    assert problems_of(workdir, "", base) == [f"model_id: model folder {workdir / 'nomodel'} does not exist"]


def test_model_folder_without_config_json(workdir):
    (workdir / "bare").mkdir()
    base = BASE_YAML.replace(".demo/model", "./bare")
    assert problems_of(workdir, "", base) == [
        f"model_id: {workdir / 'bare'} has no config.json (not a saved model folder)"]


def test_hub_model_id_is_kept_as_is(workdir):
    cfg = load(workdir, "", base=BASE_YAML.replace(".demo/model", "meta-llama/Llama-3.1-8B"))
    assert cfg.training["model_id"] == "meta-llama/Llama-3.1-8B"


def test_required_script_arguments(workdir):
    assert sorted(problems_of(workdir, "", base="max_steps: 5\n")) == [
        "dataset_path: required (the worker's script argument)",
        "model_id: required (the worker's script argument)",
    ]


def test_output_dir_is_made_absolute_against_cwd(workdir):
    assert load(workdir, "output_dir: ./out\n").training["output_dir"] == str(workdir / "out")


def test_output_dir_that_is_a_file_is_refused(workdir):
    (workdir / "out").write_text("not a folder")
    assert problems_of(workdir, "output_dir: ./out\n") == [
        f"output_dir: {workdir / 'out'} exists and is not a folder (checkpoints and the model go there)"]
    assert (workdir / "out").read_text() == "not a folder"


# --- FSDP settings that contradict each other ---------------------------------------------------

def test_fsdp_config_without_fsdp(workdir):
    (problem,) = problems_of(workdir, "fsdp_config:\n  reshard_after_forward: true\n")
    assert problem.startswith("fsdp_config: set, but fsdp is off")


@pytest.mark.parametrize("key", ["gradient_checkpointing", "activation_checkpointing"])
def test_trainer_checkpointing_with_fsdp_activation_checkpointing(workdir, key):
    text = f"{key}: true\nfsdp: true\nfsdp_config:\n  activation_checkpointing: true\n"
    (problem,) = problems_of(workdir, text)
    assert problem.startswith(f"{key}: true together with fsdp_config.activation_checkpointing: true")


def test_fsdp_activation_checkpointing_turns_off_trls_default(workdir):
    # SFTConfig defaults gradient_checkpointing to True, which transformers' Trainer refuses
    # together with FSDP's own activation checkpointing: unset must not mean "on".
    cfg = load(workdir, "fsdp: true\nfsdp_config:\n  activation_checkpointing: true\n")
    assert cfg.training["activation_checkpointing"] is False
    assert any(n.startswith("activation_checkpointing: set to false") for n in cfg.notices)


def test_fsdp_activation_checkpointing_with_trainer_checkpointing_off_is_fine(workdir):
    cfg = load(workdir, "gradient_checkpointing: false\nfsdp: true\nfsdp_config:\n  activation_checkpointing: true\n")
    assert cfg.training["gradient_checkpointing"] is False
    assert "activation_checkpointing" not in cfg.training


def test_fsdp1_sync_module_states_false_with_ram_efficient_loading(workdir):
    text = "fsdp: true\nfsdp_config:\n  version: 1\n  sync_module_states: false\n"
    (problem,) = problems_of(workdir, text)
    assert problem.startswith("fsdp_config.sync_module_states: false, but RAM-efficient loading")


def test_fsdp1_sync_module_states_false_without_ram_efficient_loading_is_fine(workdir):
    load(workdir, "fsdp: true\nfsdp_config:\n  version: 1\n  sync_module_states: false\n"
                  "  cpu_ram_efficient_loading: false\n")


def test_two_sharding_strategies_in_the_fsdp_string(workdir):
    assert problems_of(workdir, 'fsdp: "full_shard shard_grad_op auto_wrap"\n') == [
        "fsdp: contradictory sharding strategies ['full_shard', 'shard_grad_op']; choose one"]


def test_unknown_fsdp_string_option(workdir):
    (problem,) = problems_of(workdir, 'fsdp: "full_shard turbo"\n')
    assert problem.startswith("fsdp: unknown option(s) ['turbo']")


@pytest.mark.parametrize("text, key", [
    ("fsdp: true\nfsdp_config:\n  version: 3\n", "fsdp_config.version"),
    ("fsdp: true\nfsdp_config:\n  state_dict_type: HALF\n", "fsdp_config.state_dict_type"),
    ("fsdp: true\nfsdp_config:\n  auto_wrap_policy: ALL\n", "fsdp_config.auto_wrap_policy"),
    ("fsdp: true\ndeepspeed: ds.json\n", "fsdp"),
])
def test_other_fsdp_problems(workdir, text, key):
    (problem,) = problems_of(workdir, text)
    assert problem.startswith(f"{key}: ")


def test_fsdp1_only_keys_under_fsdp2_give_a_notice(workdir):
    cfg = load(workdir, "fsdp: true\nfsdp_config:\n  use_orig_params: false\n")
    assert any("use_orig_params only apply to FSDP1" in n for n in cfg.notices)


def test_fsdp_string_with_fsdp_config_file_is_left_to_transformers(workdir):
    (workdir / "fsdp.json").write_text('{"reshard_after_forward": true}')
    cfg = load(workdir, 'fsdp: "full_shard auto_wrap"\nfsdp_config: fsdp.json\n')
    assert cfg.training["fsdp"] == "full_shard auto_wrap"
    assert cfg.training["fsdp_config"] == str(workdir / "fsdp.json")   # made absolute, like every path
    assert problems_of(workdir, 'fsdp: "full_shard auto_wrap"\nfsdp_config: nofile.json\n') == [
        f"fsdp_config: {workdir / 'nofile.json'} does not exist (a JSON file of FSDP settings, or a mapping)"]


# --- launch: --------------------------------------------------------------------------------------

@pytest.mark.parametrize("launch, expected", [
    ("  retry:\n    max_restarts: -1\n", "launch.retry.max_restarts: expected a whole number >= 0, got -1"),
    ("  retry:\n    max_restarts: 1.5\n", "launch.retry.max_restarts: expected a whole number >= 0, got 1.5"),
    ("  retry:\n    max_restart: 3\n", "launch.retry.max_restart: unknown key (did you mean 'max_restarts'?)"),
    ("  retry:\n    restart_from_scratch: 1\n", "launch.retry.restart_from_scratch: expected true or false, got 1"),
    ("  retry: 3\n", "launch.retry: expected a mapping, got int"),
    ("  watchdog:\n    stall_factor: lots\n", "launch.watchdog.stall_factor: expected a number >= 0, got 'lots'"),
    ("  nproc_per_node: 0\n", "launch.nproc_per_node: expected 'auto' or an integer >= 1, got 0"),
    ("  nproc_per_node: true\n", "launch.nproc_per_node: expected 'auto' or an integer >= 1, got True"),
    ("  backend: k8s\n", "launch.backend: expected one of ['local', 'slurm'], got 'k8s'"),
    ("  stop_signal: SIGKILL\n", "launch.stop_signal: expected one of ['SIGTERM', 'SIGUSR1', 'SIGUSR2', 'SIGINT'], "
                                 "got 'SIGKILL'"),
    ("  name: has space\n", "launch.name: expected letters, digits, '.', '_' or '-' (at most 64), got 'has space'"),
    ("  nam: x\n", "launch.nam: unknown key (did you mean 'name'?)"),
    ("  env:\n    1BAD: x\n", "launch.env.1BAD: not a valid environment variable name"),
    ("  env:\n    GOOD: [1]\n", "launch.env.GOOD: expected a string or number, got list"),
    ("  env: [A]\n", "launch.env: expected a mapping of NAME: value, got list"),
    ("  slurm: [a]\n", "launch.slurm: expected a mapping, got list"),
])
def test_bad_launch_settings(workdir, launch, expected):
    assert problems_of(workdir, "launch:\n" + launch) == [expected]


def test_launch_not_a_mapping(workdir):
    assert problems_of(workdir, "launch: [1]\n") == ["launch: expected a mapping, got list"]


def test_launch_settings_are_parsed(workdir):
    cfg = load(workdir, "launch:\n  name: my-job\n  nproc_per_node: 2\n  env:\n    NCCL_DEBUG: WARN\n    N: 3\n"
                        "    FLAG: true\n  retry:\n    max_restarts: 7\n    backoff_s: 1\n")
    assert cfg.name == "my-job"
    assert cfg.launch.nproc_per_node == 2
    assert dict(cfg.launch.env) == {"NCCL_DEBUG": "WARN", "N": "3", "FLAG": "true"}
    assert cfg.launch.retry.max_restarts == 7
    assert cfg.launch.retry.backoff_s == 1.0 and isinstance(cfg.launch.retry.backoff_s, float)
    assert "launch" not in cfg.training


# --- the file itself --------------------------------------------------------------------------------

def test_yaml_syntax_error_names_the_line(workdir):
    path = write_config(workdir / "bad.yaml", "model_id: x\ndataset_path: y\nmax_steps: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, cwd=workdir)
    (problem,) = info.value.problems
    assert "not valid YAML at line 4" in problem


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_top_level_must_be_a_mapping(workdir, text):
    path = write_config(workdir / "list.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path, cwd=workdir)
    assert info.value.problems == [f"{path}: expected a mapping of key: value at the top level"]


def test_missing_config_file(workdir):
    with pytest.raises(ConfigError) as info:
        load_config(workdir / "nope.yaml", cwd=workdir)
    assert info.value.problems == [f"{workdir / 'nope.yaml'}: no such config file"]


def test_every_problem_is_reported_at_once(workdir):
    text = "learning_rat: 0.1\nper_device_train_batch_size: eight\nweight_decay: -0.1\n" \
           "launch:\n  retry:\n    max_restarts: -1\n"
    with pytest.raises(ConfigError) as info:
        load(workdir, text)
    problems = info.value.problems
    assert len(problems) == 4
    assert sorted(p.split(":")[0] for p in problems) == [
        "launch.retry.max_restarts", "learning_rat", "per_device_train_batch_size", "weight_decay"]
    rendered = info.value.render().splitlines()
    assert rendered[0] == f"error: {workdir / 'job.yaml'} has 4 problem(s):"
    assert rendered[1:] == [f"  - {p}" for p in problems]


# --- seed-era keys ----------------------------------------------------------------------------------

@pytest.mark.parametrize("line, new_key, value", [
    ("max_seq_length: 512\n", "max_length", 512),
    ("max_seq_len: 512\n", "max_length", 512),
    ('evaluation_strategy: "no"\n', "eval_strategy", "no"),
    ("torch_dtype: bfloat16\n", "dtype", "bfloat16"),
    ("no_cuda: true\n", "use_cpu", True),
    ("warmup_ratio: 0.1\n", "warmup_steps", 0.1),
])
def test_seed_key_is_renamed_with_a_notice(workdir, line, new_key, value):
    old_key = line.split(":")[0]
    cfg = load(workdir, line)
    assert cfg.training[new_key] == value
    assert old_key not in cfg.training
    assert f"{old_key} -> {new_key} (renamed in the current libraries)" in cfg.notices


@pytest.mark.parametrize("line", ["overwrite_output_dir: true\n", "logging_dir: ./logs\n"])
def test_removed_seed_key_is_dropped_with_a_notice(workdir, line):
    key = line.split(":")[0]
    cfg = load(workdir, line)
    assert key not in cfg.training
    assert any(n.startswith(f"{key}: dropped (removed in transformers 5") for n in cfg.notices)


def test_seed_fsdp_string_becomes_fsdp_true_plus_fsdp_config(workdir):
    cfg = load(workdir, 'fsdp: "full_shard auto_wrap offload"\n')
    assert cfg.training["fsdp"] is True
    assert cfg.training["fsdp_config"] == {"reshard_after_forward": True, "cpu_offload": True}
    assert any(n.startswith("fsdp: 'full_shard auto_wrap offload' -> fsdp: true") for n in cfg.notices)


def test_accelerate_style_fsdp_prefixes_are_stripped(workdir):
    cfg = load(workdir, "fsdp: true\nfsdp_config:\n  fsdp_version: 2\n  fsdp_state_dict_type: FULL_STATE_DICT\n")
    assert cfg.training["fsdp_config"] == {"version": 2, "state_dict_type": "FULL_STATE_DICT"}
    assert "fsdp_config.fsdp_version -> fsdp_config.version" in cfg.notices


def test_old_and_new_name_with_different_values_is_a_problem(workdir):
    assert problems_of(workdir, "max_seq_len: 512\nmax_length: 1024\n") == [
        "max_seq_len: set together with its new name 'max_length' to a different value; keep only 'max_length'"]


def test_old_and_new_name_with_the_same_value_is_fine(workdir):
    cfg = load(workdir, "max_seq_len: 512\nmax_length: 512\n")
    assert cfg.training["max_length"] == 512


def test_learning_rate_string_from_yaml11_becomes_a_float(workdir):
    cfg = load(workdir, "learning_rate: 2e-4\n")  # PyYAML (YAML 1.1) reads 2e-4 as a string
    assert cfg.training["learning_rate"] == 2e-4
    assert isinstance(cfg.training["learning_rate"], float)
    assert "learning_rate: '2e-4' read as 0.0002 (YAML gave a str)" in cfg.notices


# --- the CLI contract -------------------------------------------------------------------------------

def _cli(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ORCHESTRATE_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_cli_validate_bad_config_exits_2_with_every_problem_and_touches_nothing(workdir, tmp_path):
    home = tmp_path / "home"
    write_config(workdir / "BAD.yaml", BASE_YAML + "learning_rat: 0.1\nmax_seq_len: 512\nmax_length: 64\n"
                 "bf16: 3\nlaunch:\n  retry:\n    max_restarts: -1\n")
    before = _tree(tmp_path)
    result = _cli(["validate", "BAD.yaml"], cwd=workdir, home=home)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for key in ("learning_rat: unknown key", "max_seq_len: set together", "bf16: expected",
                "launch.retry.max_restarts: expected"):
        assert f"  - {key}" in result.stderr
    assert "has 4 problem(s)" in result.stderr
    assert _tree(tmp_path) == before
    assert not home.exists()


@pytest.mark.parametrize("text", [None, "a: [1\n"])
def test_cli_validate_unreadable_config_exits_2(workdir, tmp_path, text):
    if text is not None:
        write_config(workdir / "BAD.yaml", text)
    result = _cli(["validate", "BAD.yaml"], cwd=workdir, home=tmp_path / "home")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: BAD.yaml has 1 problem(s):")
    assert not (tmp_path / "home").exists()


# --- every shipped config ---------------------------------------------------------------------------

TOPOLOGIES = {"cpu": Topology(gpus=0, cpus=8, hostname="test"), "8gpu": Topology(gpus=8, cpus=64, hostname="test")}


def test_configs_dir_is_not_empty():
    assert shipped_configs(), "configs/ holds no config"


@pytest.mark.parametrize("topo", TOPOLOGIES.values(), ids=TOPOLOGIES.keys())
@pytest.mark.parametrize("config", shipped_configs(), ids=lambda p: p.name)
def test_every_shipped_config_validates_and_plans(config, topo, tmp_path, monkeypatch):
    from orchestrator.plan.inputs import KNOWN_MODELS, inspect_inputs

    workdir = make_demo_workdir(tmp_path / "work")
    home = tmp_path / "home"
    # The Hub models the configs name, as if downloaded (validation names a Hub id it cannot resolve).
    hub = {repo: {"model_type": "llama", **shape} for repo, shape in KNOWN_MODELS.items()}
    monkeypatch.setenv("HF_HUB_CACHE", str(fake_hub_cache(tmp_path / "hub", hub)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(config, cwd=workdir, inspect=inspect_inputs)
    cfg2, plan = prepare(str(config), home=home, topology=topo, cwd=str(workdir), job_id="cfg-test")
    assert cfg2 == cfg
    assert plan.world_size >= 1
    if plan.backend == "local":  # SLURM plans take the device from the allocation, not this host
        assert plan.device == ("cuda" if topo.gpus else "cpu")
    assert plan.run_dir == str(home / "runs" / "cfg-test")
    assert not home.exists()  # planning writes nothing


# --- launch.checkpoint (issue 12) ----------------------------------------------------------------

@pytest.mark.parametrize("every, steps, seconds", [(500, 500, None), ("250 steps", 250, None), ("30m", None, 1800.0),
                                                   ("90s", None, 90.0), ("2h", None, 7200.0)])
def test_launch_checkpoint_every_is_steps_or_a_time(tmp_path, every, steps, seconds):
    workdir = make_demo_workdir(tmp_path / "work")
    cfg = load(workdir, f"launch:\n  checkpoint:\n    every: {every!r}\n".replace("'", '"'))
    assert (cfg.launch.checkpoint.every_steps, cfg.launch.checkpoint.every_s) == (steps, seconds)


def test_launch_checkpoint_problems_name_the_key(tmp_path):
    workdir = make_demo_workdir(tmp_path / "work")
    probs = problems_of(workdir, "save_steps: 100\nlaunch:\n  checkpoint:\n    every: 50\n    when: now\n")
    assert any(p.startswith("launch.checkpoint.when: unknown key") for p in probs)
    assert any(p.startswith("launch.checkpoint.every: 50 steps, but save_steps is 100") for p in probs)
    probs = problems_of(workdir, "launch:\n  checkpoint:\n    every: soon\n")
    assert probs == ["launch.checkpoint.every: expected a number of steps (500, '500 steps') or a time "
                     "('90s', '30m', '2h'), got 'soon'"]


def test_the_plan_saves_by_steps_or_tells_the_worker_the_interval(tmp_path):
    workdir = make_demo_workdir(tmp_path / "work")
    topo = TOPOLOGIES["cpu"]
    for every, want_steps, want_env in [(40, 40, None), ("15m", None, "900")]:
        path = write_config(workdir / "job.yaml", BASE_YAML + f"launch:\n  checkpoint:\n    every: {every}\n")
        _, plan = prepare(str(path), home=tmp_path / "home", topology=topo, cwd=str(workdir), job_id="ck")
        assert plan.worker_config.get("save_steps") == want_steps
        assert plan.env.get("ORCHESTRATE_SAVE_EVERY_S") == want_env


# --- the seed's own YAML (issue 13) --------------------------------------------------------------

SEED_ONLY = """\
model_name: .demo/model
dataset_path: .demo/data
question_key: question
answer_key: answer
max_steps: 10
"""


def test_the_seeds_model_name_and_script_only_keys_are_accepted_with_a_notice(tmp_path):
    workdir = make_demo_workdir(tmp_path / "work")
    cfg = load(workdir, "", base=SEED_ONLY)
    assert cfg.training["model_id"] == str(workdir / ".demo/model") and "model_name" not in cfg.training
    assert "question_key" not in cfg.training and "answer_key" not in cfg.training
    assert "model_name -> model_id (renamed in the current libraries)" in cfg.notices
    assert any(n.startswith("question_key: accepted, no effect") for n in cfg.notices)


def test_tf32_is_dropped_on_a_cpu_plan_and_kept_on_a_gpu_plan(tmp_path):
    workdir = make_demo_workdir(tmp_path / "work")
    path = write_config(workdir / "job.yaml", BASE_YAML + "tf32: true\n")
    _, cpu = prepare(str(path), home=tmp_path / "h", topology=TOPOLOGIES["cpu"], cwd=str(workdir), job_id="a")
    assert "tf32" not in cpu.worker_config and any(n.startswith("tf32: True dropped on a CPU plan") for n in cpu.notices)
    _, gpu = prepare(str(path), home=tmp_path / "h", topology=TOPOLOGIES["8gpu"], cwd=str(workdir), job_id="b")
    assert gpu.worker_config["tf32"] is True


def test_a_report_to_integration_that_is_not_installed_is_an_error_naming_the_package():
    from orchestrator.config.integrations import check_report_to

    none_installed = lambda module: False  # noqa: E731
    assert check_report_to("wandb", none_installed) == [
        "report_to: 'wandb' needs the wandb package, which is not installed here (pip install wandb), "
        "or set report_to: none"]
    assert check_report_to(["none"], none_installed) == [] and check_report_to("all", none_installed) == []
    assert check_report_to(["tensorboard"], lambda m: m == "tensorboardX") == []
    assert "unknown integration 'wandbb'" in check_report_to("wandbb")[0]


def test_validate_refuses_report_to_wandb_when_wandb_is_missing(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    workdir = make_demo_workdir(tmp_path / "work")
    path = write_config(workdir / "job.yaml", BASE_YAML + "report_to: wandb\n")
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(path)], cwd=workdir,
                       capture_output=True, text=True, env={**os.environ, "ORCHESTRATE_HOME": str(tmp_path / "h")})
    assert r.returncode == 2 and "report_to: 'wandb' needs the wandb package" in r.stderr


def test_contradictory_fsdp_settings_are_refused_and_seed_false_strings_are_booleans(tmp_path):
    workdir = make_demo_workdir(tmp_path / "work")
    probs = problems_of(workdir, 'fsdp: "full_shard offload"\nfsdp_config:\n  sharding_strategy: NO_SHARD\n')
    assert probs == ["fsdp: 'full_shard' contradicts fsdp_config.sharding_strategy: NO_SHARD; keep one"]
    cfg = load(workdir, 'fsdp: "full_shard auto_wrap"\nfsdp_config:\n  forward_prefetch: "false"\n'
                        '  sharding_strategy: FULL_SHARD\n  offload_params: "false"\n')
    assert cfg.training["fsdp_config"]["forward_prefetch"] is False
    assert any("sharding_strategy, offload_params only apply to FSDP1" in n or
               ("sharding_strategy" in n and "ignored under FSDP2" in n) for n in cfg.notices), cfg.notices

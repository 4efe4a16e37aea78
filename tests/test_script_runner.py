"""The script runner's decisions without torchrun (issue 18.2): stage folders and the stage table, which
stage a resume point goes to, the supervisor's view of a later stage's progress, the stop signals outside
``train()``, and the start-up check of transformers' private methods."""
from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import make_checkpoint

from orchestrator.supervise.checkpoints import progress_mark, resume_point
from orchestrator.worker import channel, script_runner
from orchestrator.worker.stages import StageEntry, extra_folders, read_stages, record_stage, stage_folder


def test_a_later_stage_sharing_a_folder_checkpoints_in_a_subfolder_of_its_own(tmp_path):
    out = tmp_path / "out"
    assert stage_folder(out, 1, []) == out
    assert stage_folder(out, 2, [out]) == out / "stage-2"
    assert stage_folder(tmp_path / "dpo", 2, [out]) == tmp_path / "dpo"


def test_the_stage_table_keeps_the_first_entry_of_each_stage_and_ignores_foreign_rows(tmp_path):
    record_stage(tmp_path, StageEntry(1, "/o", "SFTTrainer", 1))
    record_stage(tmp_path, StageEntry(2, "/o/stage-2", "DPOTrainer", 1))
    record_stage(tmp_path, StageEntry(2, "/elsewhere", "DPOTrainer", 3))
    assert [(e.stage, e.folder, e.attempt) for e in read_stages(tmp_path)] == [(1, "/o", 1), (2, "/o/stage-2", 1)]
    data = channel.read_json(tmp_path / "script_stages.json")
    channel.write_json_atomic(tmp_path / "script_stages.json", {"stages": [*data["stages"], {"stage": "x"}]})
    assert len(read_stages(tmp_path)) == 2
    assert extra_folders(tmp_path, "/o") == [Path("/o/stage-2")]


def _plan(tmp_path, script="train.py"):
    return SimpleNamespace(run_dir=str(tmp_path / "run"), output_dir=str(tmp_path / "out"), script=script,
                           retry=SimpleNamespace(restart_from_scratch=False), worker_config={})


def test_a_new_checkpoint_of_a_later_stage_is_progress_and_its_incomplete_ones_are_moved_aside(tmp_path):
    plan = _plan(tmp_path)
    make_checkpoint(Path(plan.output_dir), 4)
    before = progress_mark(plan)
    record_stage(plan.run_dir, StageEntry(2, str(Path(plan.output_dir) / "stage-2"), "DPOTrainer", 1))
    make_checkpoint(Path(plan.output_dir) / "stage-2", 2)
    assert progress_mark(plan) > before == (4,)
    make_checkpoint(Path(plan.output_dir) / "stage-2", 4, marker=False)   # killed while saving
    assert progress_mark(plan) == (4, 2)
    events = []
    assert resume_point(plan, [], events.append, fence=lambda: None) == (str(Path(plan.output_dir) / "checkpoint-4"), None)
    assert not (Path(plan.output_dir) / "stage-2" / "checkpoint-4").exists()
    assert any("stage-2/checkpoint-4" in e and "moved to" in e for e in events), events
    assert progress_mark(_plan(tmp_path, script=None)) == (4,)   # train_worker.py jobs: the job's folder only


@pytest.fixture
def attempt_env(tmp_path, monkeypatch):
    """Rank 0 of attempt 2 of a job whose supervisor resumes from ``out/checkpoint-4``."""
    run, out = tmp_path / "run", tmp_path / "out"
    (run / "attempts" / "2").mkdir(parents=True)
    make_checkpoint(out, 4)
    for key, value in {channel.ENV_RUN_DIR: run, channel.ENV_ATTEMPT_DIR: run / "attempts" / "2",
                       channel.ENV_ATTEMPT: 2, channel.ENV_RESUME_FROM: out / "checkpoint-4", "RANK": 0}.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv(channel.ENV_FAULT, raising=False)
    return run, out


def _runner(out: Path) -> script_runner.ScriptRun:
    return script_runner.ScriptRun("train.py", ["--output_dir", str(out)])


def test_the_orchestrators_resume_point_goes_only_to_the_stage_whose_folder_holds_it(attempt_env):
    run_dir, out = attempt_env
    record_stage(run_dir, StageEntry(1, str(out), "SFTTrainer", 1))
    record_stage(run_dir, StageEntry(2, str(out / "stage-2"), "DPOTrainer", 1))
    make_checkpoint(out / "stage-2", 2)
    make_checkpoint(out / "stage-2", 6)
    run = _runner(out)
    assert run._resume_point(1, out, "SFTTrainer") == (str(out / "checkpoint-4"), channel.ENV_RESUME_FROM)
    assert run._resume_point(2, out / "stage-2", "DPOTrainer")[0] == str(out / "stage-2" / "checkpoint-6")


def test_a_stage_first_begun_now_starts_fresh_and_refuses_someone_elses_checkpoints(attempt_env):
    run_dir, out = attempt_env
    run = _runner(out)
    assert run._resume_point(2, out / "stage-2", "DPOTrainer") == (None, "no checkpoint")
    assert [e.attempt for e in read_stages(run_dir)] == [2]           # rank 0 listed it for later attempts
    make_checkpoint(out.parent / "dpo", 3)
    with pytest.raises(ValueError, match="training stage 3 .*DPOTrainer.* checkpoints this job did not write"):
        run._resume_point(3, out.parent / "dpo", "DPOTrainer")


def test_a_stop_signal_outside_train_ends_the_script_and_the_next_one_is_not_caught(monkeypatch):
    stop = script_runner.ScriptStop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        monkeypatch.setenv(channel.ENV_STOP_SIGNALS, "SIGUSR2")
        stop.install()
        stop.training = True
        stop._handler(signal.SIGUSR2, None)          # a stage trains: only the flag, the callback stops it
        assert stop and signal.getsignal(signal.SIGUSR2) == stop._handler
        stop.training, stop.armed = False, True
        with pytest.raises(script_runner._Stopped):  # no Trainer training: the script ends now
            stop._handler(signal.SIGUSR2, None)
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_transformers_without_a_hook_the_save_path_needs_is_a_user_error_naming_the_version(monkeypatch):
    import transformers

    assert script_runner.missing_trainer_hooks(transformers.Trainer) == []
    monkeypatch.delattr(transformers.Trainer, "_save_checkpoint")   # the one every save path relies on
    monkeypatch.delattr(transformers.Trainer, "add_callback")
    missing = script_runner.missing_trainer_hooks(transformers.Trainer)
    assert missing[0] == "Trainer.add_callback" and missing[1].startswith("Trainer._save_checkpoint"), missing
    with pytest.raises(ImportError) as info:   # ImportError in set-up: classified USER_ERROR, never retried
        script_runner.check_transformers()
    message = str(info.value)
    assert f"transformers {transformers.__version__} lacks Trainer.add_callback, Trainer._save_checkpoint" in message
    supported = script_runner.supported_transformers()          # from the installed package's metadata
    assert "<6" in supported and f"install a supported version (transformers{supported})" in message, message

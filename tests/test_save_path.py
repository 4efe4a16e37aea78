"""The save path's pieces without torchrun (issues 18.1, 17.3, 17.6, 16.4): the commit of a real DCP
checkpoint in one process, the fence, the per-rank file reports, the step agreement on two real gloo
processes, and the padding of epochs to the global batch."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from orchestrator.worker import channel
from orchestrator.worker.checkpoints import newest_complete, read_marker, verify_checkpoint, write_checkpoint_marker
from orchestrator.worker.commit import Committer, Save, incomplete, own_files
from orchestrator.worker.epochs import padded_indices
from orchestrator.worker.fence import Fence, Fenced


# ---- a real checkpoint folder, as one process writes it ------------------------------------------

def _dcp_checkpoint(out: Path, step: int) -> Path:
    """``checkpoint-<step>`` with a DCP model folder (one process: shard ``__0_0``), RNG state and trainer state."""
    import torch
    import torch.distributed.checkpoint as dcp

    path = out / f"checkpoint-{step}"
    state = {"model": {"w": torch.arange(64, dtype=torch.float32) * step, "b": torch.ones(8)}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path / "pytorch_model_fsdp_0")))
    torch.save({"cpu": torch.random.get_rng_state()}, path / "rng_state.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


class _Single:
    """The collectives of one process (what GroupCollectives is without a process group)."""

    def all_ok(self, flag):
        return bool(flag)

    def gather(self, obj):
        return [obj]

    def broadcast(self, obj):
        return obj


def _committer(out: Path, fence=None, limit=None, keep=()):
    from orchestrator.worker.checkpoints import rotate_checkpoints

    seen = {"commit": [], "failure": [], "points": []}
    fence = fence or Fence()

    def rotate(save):
        rotate_checkpoints(out, limit, keep=keep, before_delete=lambda p: fence.check(f"deleting {p.name}"))
    c = Committer(0, 1, None, _Single(), fence, lambda name, step: seen["points"].append(name),
                  lambda s, o: seen["commit"].append(s.step), lambda s, o: seen["failure"].append(o.error), rotate)
    return c, seen


def test_a_complete_save_is_marked_from_the_reported_files_and_verifies(tmp_path):
    path = _dcp_checkpoint(tmp_path, 4)
    committer, seen = _committer(tmp_path)
    outcome = committer.run(Save(str(path), 4, 0.0, marker={"attempt": 1}))
    assert outcome.ok and outcome.committed and seen["commit"] == [4], outcome
    assert seen["points"] == ["write", "marker"]
    marker = read_marker(path)
    assert marker["format"] == 2 and marker["attempt"] == 1
    assert set(marker["files"]) == {"pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0/__0_0.distcp",
                                    "rng_state.pth", "trainer_state.json"}
    assert verify_checkpoint(path, 4).ok


def test_a_shard_that_dcps_metadata_names_but_no_rank_reported_is_no_checkpoint(tmp_path):
    path = _dcp_checkpoint(tmp_path, 4)
    (path / "pytorch_model_fsdp_0" / "__0_0.distcp").unlink()   # e.g. another node's file, not seen by anyone
    committer, seen = _committer(tmp_path)
    outcome = committer.run(Save(str(path), 4, 0.0))
    assert not outcome.ok and not outcome.committed and read_marker(path) is None
    assert "pytorch_model_fsdp_0/__0_0.distcp (named in pytorch_model_fsdp_0/.metadata) was not reported" in \
        seen["failure"][0]


def test_the_check_against_dcp_metadata_catches_short_shards_and_missing_pieces(tmp_path):
    path = _dcp_checkpoint(tmp_path, 4)
    files = own_files(path, 0)
    assert incomplete(path, files, 1, True) is None
    short = {**files, "pytorch_model_fsdp_0/__0_0.distcp": 10}
    assert "has 10 bytes, pytorch_model_fsdp_0/.metadata points up to byte" in incomplete(path, short, 1, True)
    no_meta = {k: v for k, v in files.items() if not k.endswith(".metadata")}
    assert "pytorch_model_fsdp_0/.metadata was not reported" in incomplete(path, no_meta, 1, True)
    assert "rng_state_1.pth not reported" in incomplete(path, {**files, "rng_state_0.pth": 1}, 2, True)
    assert incomplete(path, {k: v for k, v in files.items() if k != "trainer_state.json"}, 1, True) \
        == "trainer_state.json was not reported"


def test_each_rank_reports_only_the_files_it_wrote(tmp_path):
    path = tmp_path / "checkpoint-2"
    (path / "pytorch_model_fsdp_0").mkdir(parents=True)
    for name in ("trainer_state.json", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth",
                 "pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0/__0_0.distcp",
                 "pytorch_model_fsdp_0/__1_0.distcp", "pytorch_model_fsdp_0/.metadata.tmp", ".trainer_state.json.x1"):
        (path / name).write_bytes(b"x" * 3)
    write_checkpoint_marker(path, 2)                  # never reported: it is what the reports become
    assert sorted(own_files(path, 1)) == ["pytorch_model_fsdp_0/__1_0.distcp", "rng_state_1.pth"]
    assert sorted(own_files(path, 0)) == ["pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0/__0_0.distcp",
                                          "rng_state_0.pth", "scheduler.pt", "trainer_state.json"]


def test_a_failure_on_any_rank_before_the_write_is_a_failed_save_for_all(tmp_path):
    path = _dcp_checkpoint(tmp_path, 4)

    class OneRankFailed(_Single):
        def gather(self, obj):
            return [obj, {"rank": 1, "error": "OSError: [Errno 28] No space left on device", "files": {}}]
    committer, seen = _committer(tmp_path)
    committer.coll = OneRankFailed()
    outcome = committer.run(Save(str(path), 4, 0.0))
    assert not outcome.ok and outcome.error.startswith("rank 1: OSError: [Errno 28]") and read_marker(path) is None


# ---- the fence (contract 2) ---------------------------------------------------------------------------

def _lease(run_dir: Path, *gens: int) -> None:
    (run_dir / "lease").mkdir(parents=True, exist_ok=True)
    for g in gens:
        (run_dir / "lease" / f"{g:08d}.json").write_text("{}")


def test_the_fence_comes_from_the_environment_and_a_newer_generation(tmp_path):
    assert Fence.from_environ({}).why() is None                     # run by hand: no fence
    env = {channel.ENV_LEASE_GEN: "3", channel.ENV_RUN_DIR: str(tmp_path)}
    fence = Fence.from_environ(env)
    assert fence.why() is None                                      # no lease folder yet
    _lease(tmp_path, 2, 3)
    assert fence.why() is None
    _lease(tmp_path, 4)
    assert "lease generation 4 exists and this attempt runs under generation 3" in fence.why()
    with pytest.raises(Fenced, match="fenced: deleting checkpoint-2 not done"):
        fence.check("deleting checkpoint-2")
    with pytest.raises(ValueError, match="ORCHESTRATE_LEASE_GEN='x'"):
        Fence.from_environ({channel.ENV_LEASE_GEN: "x", channel.ENV_RUN_DIR: str(tmp_path)})
    with pytest.raises(ValueError, match="ORCHESTRATE_RUN_DIR is not"):
        Fence.from_environ({channel.ENV_LEASE_GEN: "1"})


def test_a_fenced_rank_0_writes_no_marker_and_deletes_nothing(tmp_path, capfd):
    out = tmp_path / "output"
    old = _dcp_checkpoint(out, 2)
    write_checkpoint_marker(old, 2)
    new = _dcp_checkpoint(out, 4)
    _lease(tmp_path, 1, 2)
    committer, seen = _committer(out, fence=Fence(tmp_path / "lease", 1), limit=1)
    outcome = committer.run(Save(str(new), 4, 0.0))
    assert outcome.ok and not outcome.committed and seen["commit"] == []
    assert read_marker(new) is None and newest_complete(out)[0].step == 2      # checkpoint-2 is kept
    assert "fenced: the marker of checkpoint-4 not done; lease generation 2 exists" in capfd.readouterr().err


def test_rotation_stops_at_the_fence_and_keeps_the_best(tmp_path):
    out = tmp_path / "output"
    for step in (2, 4, 6):
        write_checkpoint_marker(_dcp_checkpoint(out, step), step)
    new = _dcp_checkpoint(out, 8)
    committer, _ = _committer(out, limit=1, keep=(str(out / "checkpoint-2"),))
    assert committer.run(Save(str(new), 8, 0.0)).committed
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-8"]   # the best one stays


# ---- markers: the new format's check, older markers still read ------------------------------------

def test_a_format_2_marker_lists_each_dcp_folders_metadata_and_older_markers_still_verify(tmp_path):
    path = _dcp_checkpoint(tmp_path, 6)
    files = own_files(path, 0)
    write_checkpoint_marker(path, 6, files={k: v for k, v in files.items() if not k.endswith(".metadata")})
    assert verify_checkpoint(path, 6).reason == "pytorch_model_fsdp_0/.metadata is not in the marker's list"
    write_checkpoint_marker(path, 6)                        # the older format: this process's listing, no "format"
    assert "format" not in read_marker(path) and verify_checkpoint(path, 6).ok


# ---- contract 4: what the save manager needs from transformers ---------------------------------------

def test_missing_trainer_hooks_names_what_an_installed_transformers_lacks():
    # The installed Trainer itself is checked by every integration run (SaveManager.install refuses to start
    # without its hooks); stand-ins keep this unit test from importing the whole Trainer.
    from orchestrator.worker.save_manager import missing_trainer_hooks

    class Compatible:
        def _save_checkpoint(self, model, trial):
            pass

    class Renamed:
        def _save_checkpoint(self, model, trial_or_params):
            pass
    assert missing_trainer_hooks(Compatible) == [] and missing_trainer_hooks(Compatible()) == []
    assert missing_trainer_hooks(Renamed) == missing_trainer_hooks(object) == [
        "Trainer._save_checkpoint(self, model, trial)"]


# ---- epochs: every step takes a full global batch on any layout ----------------------------------------

@pytest.mark.parametrize("rows, multiple", [(200, 16), (13, 16), (48, 16), (7, 3)])
def test_padded_indices_make_whole_global_batches(rows, multiple):
    idx = padded_indices(rows, multiple)
    assert len(idx) % multiple == 0 and idx[:rows] == list(range(rows)) and len(idx) - rows < multiple
    assert all(0 <= i < rows for i in idx)


# ---- the step agreement on two real gloo processes ------------------------------------------------------

AGREEMENT_SCRIPT = r"""
import json, sys
import torch.distributed as dist
from orchestrator.worker.collectives import StepAgreement, side_groups
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
control, writer = side_groups()
now = [0.0]
step_s = {0: 0.1, 1: 0.24}[rank]          # proposals: rank 0 5 steps, rank 1 2 steps; the smaller wins
agreement = StepAgreement(control, clock=lambda: now[0])
asks = {1: {"save": 3, "stop": None}, 0: {"save": None, "stop": 9}}[rank]
save = stop = False
seen = []
for step in range(1, 40):
    now[0] = step * step_s
    decided = agreement.read(step)
    if decided is not None:
        seen.append([step, *decided, agreement.period])
        if decided[0]:
            break
        save = save and not decided[1]
    save = save or step == asks["save"]
    stop = stop or step == asks["stop"]
    if agreement.ready():
        agreement.launch(step, stop, save)
agreement.drain()
print(json.dumps(seen))
dist.barrier()
dist.destroy_process_group()
"""


def test_the_step_agreement_gives_every_rank_the_same_decisions_at_the_same_steps(tmp_path):
    import subprocess

    script = tmp_path / "agree.py"
    script.write_text(AGREEMENT_SCRIPT)
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(store)], stdout=subprocess.PIPE, text=True,
                              env=env) for r in (0, 1)]
    out = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert out[0] == out[1], out                            # exact: the same decisions at the same steps
    # (step read, stop, save, step launched, period after it): the first reduces at every step, then the
    # period agreed from the step time (0.5 s / 0.24 s -> 2 steps)
    assert [s[0] for s in out[0]] == [2, 3, 5, 7, 9, 11] and out[0][-1][-1] == 2
    assert [(s[0], s[3]) for s in out[0] if s[2]] == [(5, 3)]          # rank 1 asked to save at step 3
    assert out[0][-1][:4] == [11, True, False, 9]                       # rank 0 asked to stop at step 9


def test_the_background_thread_runs_jobs_in_order_and_never_holds_the_process_at_exit():
    from orchestrator.worker.save_manager import Background

    bg = Background("test-bg")
    order = []
    first = bg.submit(lambda: order.append(1) or "one")
    failing = bg.submit(lambda: 1 / 0)
    assert first.result(timeout=10) == "one" and isinstance(failing.exception(timeout=10), ZeroDivisionError)
    assert bg._thread.daemon
    bg.shutdown()
    assert not bg._thread.is_alive()

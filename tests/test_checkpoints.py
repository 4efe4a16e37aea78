"""Checkpoint discovery on fake checkpoint folders: only complete ones count, and we say why."""
from __future__ import annotations

import json
import struct

import pytest
from helpers import make_checkpoint, safetensors_bytes

from orchestrator.worker import channel
from orchestrator.worker.checkpoints import list_checkpoints, newest_complete, rotate_checkpoints, verify_checkpoint


def test_complete_checkpoint_is_ok(tmp_path):
    path = make_checkpoint(tmp_path, 20)
    check = verify_checkpoint(path, 20)
    assert (check.ok, check.step, check.path, check.reason) == (True, 20, path, "")


def test_helper_writes_a_real_safetensors_file(tmp_path):
    from safetensors.numpy import load_file

    path = make_checkpoint(tmp_path, 5, weights=safetensors_bytes({"a": b"\x01\x02", "b": b"\x03"}))
    tensors = load_file(str(path / "model.safetensors"))
    assert tensors["a"].tolist() == [1, 2] and tensors["b"].tolist() == [3]


def _corrupt(path, name: str, data: bytes, *, keep_marker_size: bool = False) -> None:
    """Replace a file; by default the marker is updated to the new size, so only content checks can catch it."""
    (path / name).write_bytes(data)
    if not keep_marker_size:
        marker = channel.read_json(path / channel.CHECKPOINT_MARKER)
        marker["files"][name] = len(data)
        channel.write_json_atomic(path / channel.CHECKPOINT_MARKER, marker)


def _header(obj) -> bytes:
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw


DAMAGE_IDS = ["no marker", "half-written marker", "marker not an object", "marker without files",
              "marker files not a mapping", "weights missing", "weights truncated", "weights empty",
              "header garbage", "header promises more data", "header without offsets", "header not an object",
              "header cut short", "trainer_state missing", "trainer_state half-written"]


@pytest.mark.parametrize("damage, reason", [
    (lambda p: (p / channel.CHECKPOINT_MARKER).unlink(), "no completion marker (the save did not finish)"),
    (lambda p: (p / channel.CHECKPOINT_MARKER).write_text("{\"step\": 1"), "no completion marker"),
    (lambda p: (p / channel.CHECKPOINT_MARKER).write_text("[]"), "no completion marker"),
    (lambda p: channel.write_json_atomic(p / channel.CHECKPOINT_MARKER, {"step": 10, "files": {}}),
     "marker lists no files"),
    (lambda p: channel.write_json_atomic(p / channel.CHECKPOINT_MARKER, {"step": 10, "files": ["a"]}),
     "marker lists no files"),
    (lambda p: (p / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-5]),
     "model.safetensors has"),  # truncated: fewer bytes than the marker recorded
    (lambda p: _corrupt(p, "model.safetensors", b""), "model.safetensors has 0 bytes"),
    (lambda p: _corrupt(p, "model.safetensors", b"\xff" * 64), "model.safetensors: safetensors header unreadable"),
    (lambda p: _corrupt(p, "model.safetensors", _header({"w": {"data_offsets": [0, 16]}}) + b"x" * 8),
     "safetensors header unreadable"),  # header promises more data than the file holds
    (lambda p: _corrupt(p, "model.safetensors", _header({"w": {"dtype": "U8"}}) + b"x" * 8),
     "safetensors header unreadable"),
    (lambda p: _corrupt(p, "model.safetensors", _header(["not", "a", "dict"])), "safetensors header unreadable"),
    (lambda p: _corrupt(p, "model.safetensors", _header({})[:8] + b"{"), "safetensors header unreadable"),
    (lambda p: (p / "trainer_state.json").unlink(), "trainer_state.json missing or unreadable"),
    (lambda p: _corrupt(p, "trainer_state.json", b"{\"global_"), "trainer_state.json missing or unreadable"),
], ids=DAMAGE_IDS)
def test_damaged_checkpoint_is_skipped_with_a_reason(tmp_path, damage, reason):
    path = make_checkpoint(tmp_path, 10)
    damage(path)
    check = verify_checkpoint(path, 10)
    assert not check.ok
    assert reason in check.reason


def test_marker_step_mismatch(tmp_path):
    path = make_checkpoint(tmp_path, 10, marker_step=9)
    assert verify_checkpoint(path, 10).reason == "marker says step 9, folder says 10"


def test_trainer_state_step_mismatch(tmp_path):
    path = make_checkpoint(tmp_path, 10, state_step=8)
    assert verify_checkpoint(path, 10).reason == "trainer_state.json global_step 8 != 10"


def test_list_checkpoints_newest_first_ignoring_other_entries(tmp_path):
    for step in (5, 100, 20):
        make_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-7.tmp").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-9").write_text("a file, not a folder")
    assert list_checkpoints(tmp_path) == [(100, tmp_path / "checkpoint-100"), (20, tmp_path / "checkpoint-20"),
                                          (5, tmp_path / "checkpoint-5")]
    assert list_checkpoints(tmp_path / "missing") == []


def test_newest_complete_falls_back_and_lists_the_skipped(tmp_path):
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20)
    make_checkpoint(tmp_path, 30, marker=False)                 # the save was interrupted
    p40 = make_checkpoint(tmp_path, 40)
    (p40 / "model.safetensors").write_bytes(b"\x00" * 3)        # truncated after the marker was written
    good, skipped = newest_complete(tmp_path)
    assert good.ok and good.step == 20 and good.path == tmp_path / "checkpoint-20"
    assert [(c.step, c.ok) for c in skipped] == [(40, False), (30, False)]
    assert "model.safetensors has 3 bytes" in skipped[0].reason
    assert skipped[1].reason.startswith("no completion marker")


def test_newest_complete_with_nothing_usable(tmp_path):
    make_checkpoint(tmp_path, 10, marker=False)
    good, skipped = newest_complete(tmp_path)
    assert good is None and [c.step for c in skipped] == [10]
    assert newest_complete(tmp_path / "nothing") == (None, [])


# ---- rotation after the marker (issue 10: never fewer than one complete checkpoint) ------------

def _steps(out):
    return [step for step, _ in list_checkpoints(out)]


def test_rotation_keeps_the_newest_complete_ones_and_deletes_older(tmp_path):
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)
    deleted = rotate_checkpoints(tmp_path, 1)
    assert _steps(tmp_path) == [6] and [p.name for p in deleted] == ["checkpoint-4", "checkpoint-2"]


def test_an_incomplete_newest_checkpoint_never_costs_the_last_complete_one(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4, marker=False)          # a save cut short
    assert rotate_checkpoints(tmp_path, 1) == []
    assert _steps(tmp_path) == [4, 2] and newest_complete(tmp_path)[0].step == 2


def test_old_incomplete_folders_go_and_the_best_checkpoint_stays(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4, marker=False)
    make_checkpoint(tmp_path, 6)
    make_checkpoint(tmp_path, 8)
    rotate_checkpoints(tmp_path, 1, keep=(str(tmp_path / "checkpoint-2"),))
    assert _steps(tmp_path) == [8, 2]


def test_a_deletion_cut_short_leaves_an_incomplete_folder_not_a_damaged_complete_one(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4)

    def die_after_the_marker_goes(path):
        (path / channel.CHECKPOINT_MARKER).unlink()
        raise KeyboardInterrupt   # killed mid-rotation

    with pytest.raises(KeyboardInterrupt):
        rotate_checkpoints(tmp_path, 1, before_delete=die_after_the_marker_goes)
    good, skipped = newest_complete(tmp_path)
    assert good.step == 4 and not verify_checkpoint(tmp_path / "checkpoint-2", 2).ok


def test_no_limit_rotates_nothing(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4)
    assert rotate_checkpoints(tmp_path, None) == [] and _steps(tmp_path) == [4, 2]

"""The training data (issue 16.6): TRL's row shapes, the forms of ``dataset_path``, what validate says about
them, and that the worker's loader agrees (orchestrator/worker/data.py, data_shapes.py).

Unit tests: small files in tmp_path, ``datasets`` only where the worker's loader is the subject.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.worker import data
from orchestrator.worker.data_shapes import detect_shape

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
ROWS = {
    "messages": {"messages": CHAT},
    "prompt_completion": {"prompt": "Say hi:", "completion": " hello"},
    "conversational_prompt_completion": {"prompt": CHAT[:1], "completion": CHAT[1:]},
    "text": {"text": "hello world"},
    "conversations": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    "tokenized": {"input_ids": [1, 2, 3]},
}


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", ROWS)
def test_each_shape_is_detected_and_its_rows_pass(name):
    shape = detect_shape(ROWS[name])
    assert shape is not None and shape.name == name
    assert shape.problem(ROWS[name]) is None


def test_detection_follows_trls_precedence_and_the_text_field():
    # TRL: prompt/completion before messages; input_ids means already processed; None values are absent
    assert detect_shape({"prompt": "a", "completion": "b", "messages": CHAT}).name == "prompt_completion"
    assert detect_shape({"input_ids": [1], "text": "x"}).name == "tokenized"
    assert detect_shape({"messages": None, "text": "x"}).name == "text"
    assert detect_shape({"content": "x"}) is None
    assert detect_shape({"content": "x"}, text_field="content").name == "text"
    assert detect_shape({"prompt": "only a prompt"}) is None


@pytest.mark.parametrize("name, bad, why", [
    ("messages", {"messages": []}, "'messages' is not a non-empty list"),
    ("messages", {"text": "x"}, "no 'messages'"),
    ("messages", {"messages": [{"role": "user"}]}, "a message in 'messages' without a string 'role' and 'content'"),
    ("prompt_completion", {"prompt": "a", "completion": 3}, "'completion' is not a string"),
    ("conversational_prompt_completion", {"prompt": CHAT, "completion": "x"}, "'completion' is not a non-empty list"),
    ("text", {"text": 5}, "'text' is not a string"),
])
def test_a_row_of_another_shape_is_named(name, bad, why):
    assert detect_shape(ROWS[name]).problem(bad) == why


# --- where the data is -------------------------------------------------------------------------------

def test_folder_forms_and_their_eval_split(tmp_path):
    seed = tmp_path / "seed"
    write_jsonl(seed / "train_dataset.json", [ROWS["messages"]])
    write_jsonl(seed / "test_dataset.json", [ROWS["messages"]])
    train, ev = data.resolve(seed)
    assert (train.path.name, train.kind, ev.path.name) == ("train_dataset.json", "json", "test_dataset.json")

    jl = tmp_path / "jsonl"
    write_jsonl(jl / "train.jsonl", [ROWS["text"]])
    write_jsonl(jl / "eval.jsonl", [ROWS["text"]])
    assert [s.path.name for s in data.resolve(jl)] == ["train.jsonl", "eval.jsonl"]

    alone = tmp_path / "alone"
    write_jsonl(alone / "train.jsonl", [ROWS["text"]])
    assert data.resolve(alone)[1] is None


def test_a_single_file_and_the_eval_file_beside_it(tmp_path):
    write_jsonl(tmp_path / "chats_train.jsonl", [ROWS["messages"]])
    write_jsonl(tmp_path / "chats_test.jsonl", [ROWS["messages"]])
    write_jsonl(tmp_path / "test.jsonl", [ROWS["messages"]])
    train, ev = data.resolve(tmp_path / "chats_train.jsonl")
    assert (train.path.name, ev.path.name) == ("chats_train.jsonl", "chats_test.jsonl")   # its own name first
    train, ev = data.resolve(tmp_path / "test.jsonl")
    assert ev is None or ev.path != train.path                                           # never itself


def test_parquet_and_save_to_disk_forms(tmp_path):
    import datasets

    rows = [ROWS["prompt_completion"]] * 3
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "train.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dict"))
    train, _ = data.resolve(tmp_path / "train.parquet")
    assert train.kind == "parquet" and data.inspect_split(train).name == "prompt_completion"
    train, ev = data.resolve(tmp_path / "one")
    assert train.kind == "disk" and ev is None and len(data.peek(train)) == 3
    train, ev = data.resolve(tmp_path / "dict")
    assert (train.path.name, ev.path.name) == ("train", "validation")
    assert data.inspect_split(ev).name == "prompt_completion"


def test_a_json_array_file_is_read_too(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps([ROWS["text"], ROWS["text"]]))
    assert len(data.peek(data.resolve(tmp_path)[0])) == 2


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "holds no training data: expected one of train_dataset.json"),
    (lambda p: [write_jsonl(p / "train.jsonl", [ROWS["text"]]), write_jsonl(p / "train.json", [ROWS["text"]])],
     "holds both train.jsonl and train.json: keep one"),
])
def test_folders_that_say_nothing_clear(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(data.DataError, match=message):
        data.resolve(tmp_path)


def test_a_path_that_is_not_data(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(data.DataError, match="expected .json, .jsonl or .parquet"):
        data.resolve(tmp_path / "notes.txt")
    with pytest.raises(data.DataError, match="does not exist"):
        data.resolve(tmp_path / "nothing")


# --- what validate says ------------------------------------------------------------------------------

def test_validate_says_in_one_line_which_shape_it_found(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [ROWS["conversational_prompt_completion"]] * 3)
    write_jsonl(tmp_path / "test.jsonl", [ROWS["conversational_prompt_completion"]])
    notices, problems, shape = data.validate(tmp_path, eval_strategy="epoch")
    assert problems == [] and shape.name == "conversational_prompt_completion"
    assert notices == [f"data: prompt/completion (conversational) rows in {tmp_path / 'train.jsonl'}; "
                       f"eval split {tmp_path / 'test.jsonl'}"]


def test_validate_names_what_it_expected(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "q?", "answer": "a"}])
    _, (problem,), _ = data.validate(tmp_path)
    assert problem.startswith(f"dataset_path: {tmp_path / 'train.jsonl'}: line 1 has fields ['answer', 'question']; "
                              "expected one of TRL's shapes: {\"messages\": ")
    assert '{"prompt": "...", "completion": "..."}' in problem and "(dataset_text_field: text)" in problem
    write_jsonl(tmp_path / "train.jsonl", [{"body": "some text"}])
    _, (problem,), _ = data.validate(tmp_path)
    assert problem.endswith("if 'body' holds the text, set dataset_text_field: body")
    assert data.validate(tmp_path, text_field="body")[1] == []


def test_validate_names_bad_rows_among_the_first_and_a_missing_eval_split(tmp_path):
    rows = [ROWS["messages"]] * 5
    rows[3] = {"messages": [{"role": "user", "content": 7}]}
    write_jsonl(tmp_path / "train_dataset.json", rows)
    (tmp_path / "x.txt").write_text("")
    _, problems, _ = data.validate(tmp_path, eval_strategy="steps")
    assert problems == [
        f"dataset_path: {tmp_path / 'train_dataset.json'}: 1 bad row(s) among the first 5 (line 4: a message in "
        "'messages' without a string 'role' and 'content'); the first row is conversational (messages), so every "
        'row must be {"messages": [{"role": "user", "content": "..."}, ...]}',
        f"eval_strategy: 'steps' needs an eval split, but there is none beside {tmp_path / 'train_dataset.json'} "
        "(expected test_dataset.json, test_dataset.jsonl, test.jsonl or eval.jsonl, or a DatasetDict 'test' split); "
        "add one, or set eval_strategy: no"]


def test_validate_names_a_line_that_is_not_json(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(ROWS["text"]) + "\n{oops\n")
    _, (problem,), _ = data.validate(tmp_path)
    assert problem.startswith(f"dataset_path: {tmp_path / 'train.jsonl'}: line 2 is not valid JSON")


# --- the worker's loader: every row -------------------------------------------------------------------

def test_the_worker_loads_every_row_and_finds_a_bad_one_past_what_validate_reads(tmp_path):
    rows = [ROWS["prompt_completion"]] * (data.PEEK_ROWS + 10)
    rows[data.PEEK_ROWS + 4] = {"prompt": "no completion here"}
    write_jsonl(tmp_path / "train.jsonl", rows)
    assert data.validate(tmp_path)[1] == []          # the first PEEK_ROWS rows are fine
    with pytest.raises(ValueError) as info:
        data.load(tmp_path)
    assert type(info.value) is ValueError            # a user error to the failure classes, not a crash
    assert f"{tmp_path / 'train.jsonl'}: 1 bad row(s) (line {data.PEEK_ROWS + 5}: no 'completion')" in str(info.value)


def test_the_worker_loads_each_form_with_its_eval_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([ROWS["text"]] * 4),
                          "test": datasets.Dataset.from_list([ROWS["text"]] * 2)}).save_to_disk(str(tmp_path / "d"))
    loaded = data.load(tmp_path / "d", want_eval=True)
    assert (len(loaded.train), len(loaded.eval)) == (4, 2)
    assert loaded.description == (f"language modelling text ('text') rows in {tmp_path / 'd' / 'train'}; "
                                  f"eval split {tmp_path / 'd' / 'test'}")
    write_jsonl(tmp_path / "f" / "train.jsonl", [ROWS["conversational_prompt_completion"]] * 3)
    loaded = data.load(tmp_path / "f" / "train.jsonl")
    assert loaded.eval is None and loaded.train[0]["completion"][0]["role"] == "assistant"
    with pytest.raises(ValueError, match="evaluation is on .* but there is no eval split"):
        data.load(tmp_path / "f" / "train.jsonl", want_eval=True)

"""The training data: where it is, which of TRL's row shapes it has, and loading it (issue 16.6).

Shared by ``orchestrate validate`` (which reads only the first rows, without importing ``datasets``) and
the worker (which loads every row with ``datasets`` and checks each one), so both agree on what a
``dataset_path`` means and which rows are good. No torch import.

``dataset_path`` is one of

* a folder holding one training file, ``train_dataset.json`` (the seed's name), ``train_dataset.jsonl``,
  ``train.jsonl``, ``train.json`` or ``train.parquet``; the eval split beside it is the first of
  ``test_dataset.json``, ``test.jsonl``, ``eval.jsonl``, ... (:data:`EVAL_FILES`);
* a ``datasets`` ``save_to_disk`` folder: one saved ``Dataset`` (no eval split), or a ``DatasetDict`` with a
  ``train`` split and a ``test``/``eval``/``validation`` one;
* a single ``.json``/``.jsonl``/``.parquet`` file; its eval split is a file beside it with ``train`` in
  the name replaced by ``test``/``eval``/``validation``, or one of :data:`EVAL_FILES`.

JSON files hold JSON lines (one object per line) or one JSON array of objects. The row shapes are TRL's
(:data:`SHAPES`): conversational ``messages``, ``prompt``/``completion`` (plain strings or conversations),
``text`` (the field named by ``dataset_text_field``), ShareGPT ``conversations`` (TRL converts them) and
already tokenized ``input_ids``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .data_shapes import MAX_SHOWN, Shape, bad_rows, detect_shape, expected

PEEK_ROWS = 64          # rows validation reads from each split (the worker checks every row)

TRAIN_FILES = ("train_dataset.json", "train_dataset.jsonl", "train.jsonl", "train.json", "train.parquet")
EVAL_FILES = ("test_dataset.json", "test_dataset.jsonl", "test.jsonl", "test.json", "eval.jsonl", "eval.json",
              "validation.jsonl", "validation.json", "test.parquet", "eval.parquet", "validation.parquet")
EVAL_SPLITS = ("test", "eval", "validation")
KINDS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """The data cannot be used as it is; the message names the file (and rows) and what was expected."""


@dataclass(frozen=True)
class Source:
    """One split: a file (``json``/``parquet``) or a ``save_to_disk`` folder of one ``Dataset`` (``disk``)."""

    path: Path
    kind: str

    @property
    def unit(self) -> str:
        return "line" if self.kind == "json" else "row"


# ---- where the data is ---------------------------------------------------------------------------

def _file_source(path: Path) -> Source:
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: not a data file orchestrate reads (expected .json, .jsonl or .parquet, or a folder)")
    return Source(path, kind)


def _first_file(folder: Path, names: Iterable[str], exclude: Path | None = None) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file() and folder / n != exclude), None)


def _eval_beside(train: Path) -> Source | None:
    """The eval file beside a training file named on its own (``dataset_path: data/x_train.jsonl``)."""
    names = [train.name.replace("train", w) for w in EVAL_SPLITS if "train" in train.name]
    found = _first_file(train.parent, [*names, *EVAL_FILES], exclude=train)
    return _file_source(found) if found else None


def _saved_dict(folder: Path) -> tuple[Source, Source | None]:
    try:
        splits = list(json.loads((folder / "dataset_dict.json").read_text()).get("splits") or [])
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(f"{folder / 'dataset_dict.json'}: unreadable ({e})") from None
    if "train" not in splits:
        raise DataError(f"{folder}: a saved DatasetDict without a 'train' split (splits: {splits})")
    evals = [s for s in EVAL_SPLITS if s in splits]
    return Source(folder / "train", "disk"), (Source(folder / evals[0], "disk") if evals else None)


def resolve(dataset_path: str | Path) -> tuple[Source, Source | None]:
    """``(train, eval or None)`` for ``dataset_path``; :class:`DataError` names what was expected."""
    p = Path(dataset_path)
    if p.is_file():
        return _file_source(p), _eval_beside(p)
    if not p.is_dir():
        raise DataError(f"{p} does not exist (expected a folder with {TRAIN_FILES[0]} or train.jsonl, a datasets "
                        "save_to_disk folder, or a .json/.jsonl/.parquet file)")
    if (p / "dataset_dict.json").is_file():
        return _saved_dict(p)
    if (p / "state.json").is_file():
        return Source(p, "disk"), None
    found = [n for n in TRAIN_FILES if (p / n).is_file()]
    if not found:
        raise DataError(f"{p} holds no training data: expected one of {', '.join(TRAIN_FILES)} there, a datasets "
                        "save_to_disk folder, or dataset_path naming a .json/.jsonl/.parquet file")
    if len(found) > 1:
        raise DataError(f"{p} holds both {found[0]} and {found[1]}: keep one, or point dataset_path at the file "
                        "to train on")
    train = p / found[0]
    found_eval = _first_file(p, EVAL_FILES)
    return _file_source(train), (_file_source(found_eval) if found_eval else None)


def no_shape_error(source: Source, row: Any, text_field: str) -> DataError:
    if not isinstance(row, dict):
        return DataError(f"{source.path}: {source.unit} 1 is not an object ({type(row).__name__}); each row must be "
                         f"{expected(text_field)}")
    fields = sorted(k for k, v in row.items() if v is not None)
    hint = ""
    strings = [k for k in fields if isinstance(row[k], str)]
    if row.get("prompt") is not None and row.get("completion") is None:
        hint = "; a prompt without a completion is for preference/RL trainers, SFT needs 'completion' too"
    elif len(strings) == 1:
        hint = f"; if '{strings[0]}' holds the text, set dataset_text_field: {strings[0]}"
    return DataError(f"{source.path}: {source.unit} 1 has fields {fields}; expected {expected(text_field)}{hint}")


def bad_rows_error(source: Source, bad: list[tuple[int, str]], shape: Shape, checked: str = "") -> DataError:
    shown = "; ".join(f"{source.unit} {n}: {why}" for n, why in bad[:MAX_SHOWN])
    more = "; ..." if len(bad) > MAX_SHOWN else ""
    return DataError(f"{source.path}: {len(bad)} bad row(s){checked} ({shown}{more}); the first row is "
                     f"{shape.label}, so every row must be {shape.example}")


# ---- validation: the first rows, cheaply ------------------------------------------------------------

def peek(source: Source, n: int = PEEK_ROWS) -> list[Any]:
    """The first ``n`` rows of ``source`` without ``datasets`` (JSON by hand, Arrow/Parquet with pyarrow)."""
    try:
        if source.kind == "json":
            return _peek_json(source.path, n)
        if source.kind == "parquet":
            import pyarrow.parquet as pq

            batch = next(pq.ParquetFile(source.path).iter_batches(batch_size=n), None)
            return batch.to_pylist() if batch is not None else []
        return _peek_arrow(source.path, n)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader error is "this file cannot be read", named
        raise DataError(f"{source.path}: cannot be read ({type(e).__name__}: {e})") from None


def _peek_json(path: Path, n: int) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):   # one JSON array of objects (datasets reads it too)
            try:
                data = json.load(f)
            except ValueError as e:
                raise DataError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(data, list):
                raise DataError(f"{path}: expected JSON lines or a JSON array of objects")
            return data[:n]
        rows = []
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise DataError(f"{path}: line {number} is not valid JSON ({e}); expected JSON lines (one object "
                                "per line) or one JSON array of objects") from None
            if len(rows) >= n:
                break
        return rows


def _peek_arrow(folder: Path, n: int) -> list[Any]:
    import pyarrow as pa

    state = json.loads((folder / "state.json").read_text())
    rows: list[Any] = []
    for entry in state.get("_data_files") or []:
        with pa.memory_map(str(folder / entry["filename"])) as source:
            reader = pa.ipc.open_stream(source)
            for batch in reader:
                rows += batch.to_pylist()[:n - len(rows)]
                if len(rows) >= n:
                    return rows
    return rows


def inspect_split(source: Source, text_field: str = "text", n: int = PEEK_ROWS) -> Shape:
    """The shape of ``source``'s first rows; :class:`DataError` if they have none or disagree."""
    rows = peek(source, n)
    if not rows:
        raise DataError(f"{source.path}: no rows")
    shape = detect_shape(rows[0], text_field)
    if shape is None:
        raise no_shape_error(source, rows[0], text_field)
    bad = bad_rows(rows, shape)
    if bad:
        raise bad_rows_error(source, bad, shape, checked=f" among the first {len(rows)}")
    return shape


def describe(train: Source, shape: Shape, eval_source: Source | None, eval_shape: Shape | None,
             used: bool = True) -> str:
    """One line: which shape was found where, and the eval split."""
    line = f"{shape.label} rows in {train.path}"
    if eval_source is not None:
        same = eval_shape is None or eval_shape.name == shape.name
        line += f"; eval split {eval_source.path}" + ("" if same else f" ({eval_shape.label})")
        line += "" if used else " (not used: eval_strategy is no)"
    return line


def validate(dataset_path: str | Path, text_field: str = "text", eval_strategy: str = "no"
             ) -> tuple[list[str], list[str], Shape | None]:
    """``(notices, problems, shape)`` for ``orchestrate validate``: the splits, the shape of their first rows, bad
    rows among them, an eval split that evaluation needs. The notice is one line saying what was found."""
    try:
        train, eval_source = resolve(dataset_path)
    except DataError as e:
        return [], [f"dataset_path: {e}"], None
    problems: list[str] = []
    want_eval = str(eval_strategy) != "no"
    shape = eval_shape = None
    try:
        shape = inspect_split(train, text_field)
    except DataError as e:
        problems.append(f"dataset_path: {e}")
    if want_eval and eval_source is None:
        problems.append(f"eval_strategy: {eval_strategy!r} needs an eval split, but there is none beside {train.path} "
                        f"(expected {', '.join(EVAL_FILES[:3])} or eval.jsonl, or a DatasetDict 'test' split); "
                        "add one, or set eval_strategy: no")
    elif want_eval:
        try:
            eval_shape = inspect_split(eval_source, text_field)
        except DataError as e:
            problems.append(f"dataset_path: eval split {e}")
    if problems or shape is None:
        return [], problems, shape
    return [f"data: {describe(train, shape, eval_source, eval_shape, used=want_eval)}"], [], shape


# ---- the worker: every row, with datasets -------------------------------------------------------------

@dataclass
class LoadedData:
    train: Any                 # datasets.Dataset
    eval: Any | None
    description: str


def load_split(source: Source, text_field: str = "text"):
    """Every row of ``source`` as a ``datasets.Dataset``, each checked against the first row's shape."""
    import datasets

    try:
        if source.kind == "disk":
            ds = datasets.load_from_disk(str(source.path))
        else:
            ds = datasets.load_dataset(source.kind, data_files=str(source.path), split="train")
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise DataError(f"{source.path}: cannot be read as {source.kind} data ({type(e).__name__}: {e})") from e
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{source.path}: expected one saved Dataset, found {type(ds).__name__}")
    if len(ds) == 0:
        raise DataError(f"{source.path}: no rows")
    shape = detect_shape(ds[0], text_field)
    if shape is None:
        raise no_shape_error(source, ds[0], text_field)
    columns = ds.select_columns(list(shape.columns))   # detect_shape found them in the first row
    bad: list[tuple[int, str]] = []
    for start in range(0, len(columns), 1000):   # a batch at a time: never the whole column in memory
        batch = columns[start:start + 1000]
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        bad += bad_rows(rows, shape, first=start + 1)
    if bad:
        raise bad_rows_error(source, bad, shape)
    return ds, shape


def load(dataset_path: str | Path, text_field: str = "text", want_eval: bool = False) -> LoadedData:
    """The training split (and the eval split when ``want_eval``), every row checked. Raises a plain
    ValueError (what the orchestrator's failure classes know as the user's error) naming file and rows."""
    try:
        return _load(dataset_path, text_field, want_eval)
    except DataError as e:
        error = e
    raise ValueError(str(error)) from error.__cause__


def _load(dataset_path: str | Path, text_field: str, want_eval: bool) -> LoadedData:
    train_source, eval_source = resolve(dataset_path)
    train, shape = load_split(train_source, text_field)
    evaluation, eval_shape = None, None
    if want_eval:
        if eval_source is None:
            raise DataError(f"{dataset_path}: evaluation is on (eval_strategy), but there is no eval split: "
                            f"expected {', '.join(EVAL_FILES[:5])}, ... beside the training data")
        evaluation, eval_shape = load_split(eval_source, text_field)
    return LoadedData(train, evaluation, describe(train_source, shape, eval_source if want_eval else None,
                                                  eval_shape))

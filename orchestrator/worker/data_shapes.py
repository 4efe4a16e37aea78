"""TRL's SFT row shapes: which one a row has, and whether every row has it (issue 16.6).

Pure Python (no ``datasets``, no torch): :mod:`orchestrator.worker.data` uses it for the first rows in
validation and for every row in the worker.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

MAX_SHOWN = 5           # bad rows named in one message


def _present(row: dict, key: str) -> bool:
    return row.get(key) is not None


def _chat_problem(value: Any, key: str, role: str = "role", content: str = "content", empty_ok: bool = False
                  ) -> str | None:
    if value is None:
        return f"no '{key}'"
    if not isinstance(value, list) or not (value or empty_ok):
        return f"'{key}' is not a non-empty list"
    if not all(isinstance(m, dict) and isinstance(m.get(role), str) and isinstance(m.get(content), str)
               for m in value):
        return f"a message in '{key}' without a string '{role}' and '{content}'"
    return None


def _string_problem(value: Any, key: str) -> str | None:
    if value is None:
        return f"no '{key}'"
    return None if isinstance(value, str) else f"'{key}' is not a string"


@dataclass(frozen=True)
class Shape:
    """One of TRL's row shapes: its name, a one-line description and the check each row must pass."""

    name: str
    label: str
    example: str
    columns: tuple[str, ...]
    check: Callable[[dict], str | None]

    def problem(self, row: dict) -> str | None:
        return self.check(row)


def _pc_check(conversational: bool) -> Callable[[dict], str | None]:
    def check(row: dict) -> str | None:
        if conversational:
            return _chat_problem(row.get("prompt"), "prompt") or _chat_problem(row.get("completion"), "completion")
        return _string_problem(row.get("prompt"), "prompt") or _string_problem(row.get("completion"), "completion")
    return check


def _ids_problem(row: dict) -> str | None:
    ids = row.get("input_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        return "'input_ids' is not a non-empty list of token ids"
    return None


def shapes(text_field: str = "text") -> dict[str, Shape]:
    """TRL's SFT row shapes, by name (``text_field``: SFTConfig's ``dataset_text_field``)."""
    chat = '[{"role": "user", "content": "..."}, ...]'
    return {s.name: s for s in (
        Shape("messages", "conversational (messages)", '{"messages": ' + chat + "}", ("messages",),
              lambda r: _chat_problem(r.get("messages"), "messages")),
        Shape("prompt_completion", "prompt/completion (plain text)",
              '{"prompt": "...", "completion": "..."}', ("prompt", "completion"), _pc_check(False)),
        Shape("conversational_prompt_completion", "prompt/completion (conversational)",
              '{"prompt": ' + chat + ', "completion": [{"role": "assistant", "content": "..."}]}',
              ("prompt", "completion"), _pc_check(True)),
        Shape("text", f"language modelling text ('{text_field}')", '{"' + text_field + '": "..."}', (text_field,),
              lambda r: _string_problem(r.get(text_field), text_field)),
        Shape("conversations", "conversational (ShareGPT 'conversations', converted by TRL)",
              '{"conversations": [{"from": "human", "value": "..."}, ...]}', ("conversations",),
              lambda r: _chat_problem(r.get("conversations"), "conversations", "from", "value")),
        Shape("tokenized", "already tokenized (input_ids)", '{"input_ids": [1, 2, ...]}', ("input_ids",),
              _ids_problem),
    )}


def expected(text_field: str = "text") -> str:
    """What a row may look like, for messages that name what was expected."""
    s = shapes(text_field)
    return (f"one of TRL's shapes: {s['messages'].example}, {s['prompt_completion'].example} (the prompt and "
            f"completion may also be conversations), {s['text'].example} (dataset_text_field: {text_field}) or "
            f"{s['tokenized'].example}")


def detect_shape(row: Any, text_field: str = "text") -> Shape | None:
    """The shape of ``row`` in TRL's order of precedence, or None."""
    if not isinstance(row, dict):
        return None
    s = shapes(text_field)
    if _present(row, "input_ids"):
        return s["tokenized"]
    if _present(row, "prompt") and _present(row, "completion"):
        conversational = isinstance(row["prompt"], list) or isinstance(row["completion"], list)
        return s["conversational_prompt_completion" if conversational else "prompt_completion"]
    if _present(row, "messages"):
        return s["messages"]
    if _present(row, "conversations"):
        return s["conversations"]
    if isinstance(row.get(text_field), str):
        return s["text"]
    return None


def bad_rows(rows: Iterable[Any], shape: Shape, first: int = 1) -> list[tuple[int, str]]:
    """``(row number, why)`` of the rows that do not have ``shape`` (numbered from ``first``)."""
    return [(n, why) for n, row in enumerate(rows, first)
            if (why := ("not an object" if not isinstance(row, dict) else shape.problem(row)))]

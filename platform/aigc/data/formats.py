"""Row formats: each turns one raw record into a conversation, or rejects it with a reason.

| format     | fields                                                        |
|------------|---------------------------------------------------------------|
| alpaca     | instruction, output, optional input, optional system          |
| messages   | messages: [{role: system|user|assistant, content}], last is assistant |
| sharegpt   | conversations: [{from: system|human|gpt, value}], last is gpt |
| text       | text (trained on whole, no template)                          |

The training target is the last assistant turn; everything before it is the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["FORMATS", "RowError", "Example", "to_example", "required_fields"]


class RowError(ValueError):
    """A row does not fit its format. ``reason`` is a short code counted in stats.json."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Example:
    """A validated row: the conversation before the target turn, and the target text."""

    messages: list[dict[str, str]]  # prompt turns; empty for the text format
    response: str
    raw_text: bool = False  # text format: no chat template


_REQUIRED = {
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "text": ("text",),
}
_OPTIONAL = {"alpaca": ("input", "system"), "messages": (), "sharegpt": ("system",), "text": ()}
FORMATS = tuple(_REQUIRED)
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


def required_fields(fmt: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) field names of a format."""
    return _REQUIRED[fmt], _OPTIONAL[fmt]


def _field(row: dict[str, Any], name: str, *, optional: bool = False) -> str:
    if name not in row or row[name] is None:
        if optional:
            return ""
        raise RowError("missing_field", f"missing field {name!r}")
    value = row[name]
    if not isinstance(value, str):
        raise RowError("wrong_type", f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _turns(row: dict[str, Any], key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
    turns = row.get(key)
    if turns is None:
        raise RowError("missing_field", f"missing field {key!r}")
    if not isinstance(turns, list) or not turns:
        raise RowError("wrong_type", f"field {key!r} must be a non-empty list of turns")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RowError("wrong_type", f"{key}[{i}] must be an object")
        role, text = t.get(role_key), t.get(text_key)
        if role not in roles:
            raise RowError("bad_role", f"{key}[{i}].{role_key} must be one of {sorted(roles)}, got {role!r}")
        if not isinstance(text, str):
            raise RowError("wrong_type", f"{key}[{i}].{text_key} must be a string, got {type(text).__name__}")
        out.append({"role": roles[role], "content": text})
    if out[-1]["role"] != "assistant":
        raise RowError("no_assistant_turn", f"the last turn of {key!r} must be the assistant's")
    if not any(m["role"] == "user" for m in out[:-1]):
        raise RowError("no_user_turn", f"{key!r} has no user turn before the assistant's answer")
    return out


def to_example(row: dict[str, Any], fmt: str, system_prompt: str | None = None) -> Example:
    """Validate one record and turn it into an :class:`Example`.

    Raises:
        RowError: the row does not fit ``fmt``; ``reason`` is one of missing_field, wrong_type,
            empty_prompt, empty_response, bad_role, no_user_turn, no_assistant_turn.
    """
    if fmt == "text":
        text = _field(row, "text")
        if not text.strip():
            raise RowError("empty_response", "field 'text' is empty")
        return Example(messages=[], response=text, raw_text=True)

    if fmt == "alpaca":
        instruction, output = _field(row, "instruction"), _field(row, "output")
        extra, system = _field(row, "input", optional=True), _field(row, "system", optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        if not prompt.strip():
            raise RowError("empty_prompt", "field 'instruction' is empty")
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        if system.strip():
            turns.insert(0, {"role": "system", "content": system})
    elif fmt == "messages":
        turns = _turns(row, "messages", "role", "content", {r: r for r in ("system", "user", "assistant")})
    elif fmt == "sharegpt":
        turns = _turns(row, "conversations", "from", "value", _SHAREGPT_ROLES)
        system = _field(row, "system", optional=True)
        if system.strip() and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": system})
    else:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")

    if not turns[-1]["content"].strip():
        raise RowError("empty_response", "the assistant's answer is empty")
    if system_prompt and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt})
    return Example(messages=turns[:-1], response=turns[-1]["content"])

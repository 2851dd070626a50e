"""Row formats: each turns one raw record into a conversation, or rejects it with a reason.

| format   | fields (``?`` = optional)                                                                       |
|----------|-------------------------------------------------------------------------------------------------|
| alpaca   | instruction, output, input?, system?, history? = [[instruction, output], ...] oldest first      |
| messages | messages = [{role: system/user/assistant/tool, content, tool_calls?}], tools?                   |
| sharegpt | conversations = [{from: system/human/gpt/function_call/observation, value}], system?, tools?    |
| text     | text (trained whole, no template)                                                               |

Every assistant turn is trained (``gpt`` and ``function_call`` in sharegpt, the output of each ``history``
pair in alpaca); system, user and tool turns (``observation``) are the prompt. The conversation must end with
an assistant turn and have a user turn before it.

Tool calling, as in the public tool-calling sets (glaive, LLaMA-Factory's ``glaive_toolcall``):

- ``tools``: the row's tool schemas, a list or a JSON string of one; ``{name, description, parameters}``
  entries are wrapped as ``{"type": "function", "function": {...}}``. A string that is not JSON, or entries
  without a name, reject the row as ``bad_tools``.
- sharegpt ``function_call``: the assistant calling a tool; its value is JSON ``{"name", "arguments"}`` (or a
  list of them for parallel calls). ``observation``: the tool's answer.
- messages: an assistant turn may carry OpenAI/transformers ``tool_calls`` (``arguments`` a dict or a JSON
  string); role ``tool`` is a tool's answer. A call that is not valid is ``bad_tool_call``.

Tool calls are passed to the chat template as transformers expects them
(``{"type": "function", "function": {"name", "arguments": {...}}}``).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

__all__ = ["FORMATS", "RowError", "Example", "conversation_key", "parse_record", "to_example", "required_fields"]


class RowError(ValueError):
    """A row does not fit its format. ``reason`` is a short code counted in stats.json."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_record(raw: str) -> dict[str, Any]:
    """One raw record (a JSON string) as the object every format reads.

    Raises:
        RowError: ``invalid_json``, or ``wrong_type`` for JSON that is not an object.
    """
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RowError("invalid_json", f"not valid JSON: {exc.msg}") from None
    if not isinstance(rec, dict):
        raise RowError("wrong_type", f"a record must be an object, got {type(rec).__name__}")
    return rec


@dataclass(frozen=True)
class Example:
    """A validated row: the whole conversation (ending with an assistant turn) and its tools, or plain text."""

    turns: list[dict[str, Any]]  # empty for the text format
    tools: list[dict[str, Any]] | None = None
    text: str = ""  # the text format: trained whole, no chat template

    @property
    def raw_text(self) -> bool:
        return not self.turns


_REQUIRED = {
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "text": ("text",),
}
_OPTIONAL = {
    "alpaca": ("input", "system", "history"),
    "messages": ("tools",),
    "sharegpt": ("system", "tools"),
    "text": (),
}
FORMATS = tuple(_REQUIRED)
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
_MESSAGE_ROLES = ("system", "user", "assistant", "tool")


def required_fields(fmt: str, preference: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) field names of a format; with ``preference``, of its pairs (:mod:`aigc.data.pairs`)."""
    if preference:
        return tuple(f for f in _REQUIRED[fmt] if f != "output") + ("chosen", "rejected"), _OPTIONAL[fmt]
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


def _json(value: Any, reason: str, where: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise RowError(reason, f"{where} is not valid JSON: {exc.msg} at character {exc.pos}") from None


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """The row's tool schemas as transformers takes them, or None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    tools = _json(value, "bad_tools", "field 'tools'")
    tools = [tools] if isinstance(tools, dict) else tools
    if not isinstance(tools, list):
        raise RowError("bad_tools", f"field 'tools' must be a list of tool schemas, got {type(tools).__name__}")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError("bad_tools", f"tools[{i}] must be a tool schema with a name")
        out.append({"type": "function", "function": fn})
    return out or None


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """Tool calls as transformers takes them; ``value`` is a call, a list of calls, or JSON of either."""
    calls = _json(value, "bad_tool_call", where)
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls:
        raise RowError("bad_tool_call", f"{where} must be a tool call {{name, arguments}} or a list of them")
    out = []
    for i, c in enumerate(calls):
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError("bad_tool_call", f"{where}[{i}] must be a tool call with a name")
        args = _json(fn.get("arguments", {}), "bad_tool_call", f"{where}[{i}].arguments")
        if not isinstance(args, dict):
            raise RowError("bad_tool_call", f"{where}[{i}].arguments must be an object")
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


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
        where = f"{key}[{i}]"
        if role == "function_call":  # sharegpt: the value is the call
            out.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(text, f"{where}.{text_key}")})
            continue
        calls = t.get("tool_calls") if roles[role] == "assistant" else None
        if calls is not None:
            text = "" if text is None else text
        if not isinstance(text, str):
            raise RowError("wrong_type", f"{where}.{text_key} must be a string, got {type(text).__name__}")
        turn = {"role": roles[role], "content": text}
        if calls is not None:
            turn["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
        for extra in ("name", "tool_call_id"):  # a tool result may name its tool or call
            if roles[role] == "tool" and isinstance(t.get(extra), str):
                turn[extra] = t[extra]
        out.append(turn)
    return out


def _history(row: dict[str, Any]) -> list[dict[str, str]]:
    history = row.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise RowError("wrong_type", f"field 'history' must be a list of [instruction, output] pairs, got "
                       f"{type(history).__name__}")  # fmt: skip
    out = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RowError("wrong_type", f"history[{i}] must be [instruction, output], two strings")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def _check(turns: list[dict[str, Any]], where: str) -> None:
    if turns[-1]["role"] != "assistant":
        raise RowError("no_assistant_turn", f"the last turn of {where!r} must be the assistant's")
    if not any(m["role"] == "user" for m in turns[:-1]):
        raise RowError("no_user_turn", f"{where!r} has no user turn before the assistant's answer")
    for i, m in enumerate(turns):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            last = i == len(turns) - 1
            raise RowError("empty_response", "the assistant's answer is empty" if last else
                           f"assistant turn {i} of {where!r} is empty")  # fmt: skip


def to_example(row: dict[str, Any], fmt: str, system_prompt: str | None = None) -> Example:
    """Validate one record and turn it into an :class:`Example`.

    ``system_prompt`` becomes the first turn of a conversation that has no system turn.

    Raises:
        RowError: the row does not fit ``fmt``; ``reason`` is one of missing_field, wrong_type,
            empty_prompt, empty_response, bad_role, no_user_turn, no_assistant_turn, bad_tools, bad_tool_call.
    """
    if fmt == "text":
        text = _field(row, "text")
        if not text.strip():
            raise RowError("empty_response", "field 'text' is empty")
        return Example(turns=[], text=text)

    tools = None
    if fmt == "alpaca":
        instruction, output = _field(row, "instruction"), _field(row, "output")
        extra, system = _field(row, "input", optional=True), _field(row, "system", optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        if not prompt.strip():
            raise RowError("empty_prompt", "field 'instruction' is empty")
        turns = [*_history(row), {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        if system.strip():
            turns.insert(0, {"role": "system", "content": system})
        where = "history"
    elif fmt == "messages":
        roles = {r: r for r in _MESSAGE_ROLES}
        turns, tools, where = _turns(row, "messages", "role", "content", roles), _tools(row.get("tools")), "messages"
    elif fmt == "sharegpt":
        turns = _turns(row, "conversations", "from", "value", _SHAREGPT_ROLES)
        system, tools, where = _field(row, "system", optional=True), _tools(row.get("tools")), "conversations"
        if system.strip() and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": system})
    else:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")

    _check(turns, where)
    if system_prompt and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt})
    return Example(turns=turns, tools=tools)


_SPACE = re.compile(r"\s+")


def _normal(value: Any) -> Any:
    """NFC, runs of whitespace as one space, stripped; through lists and dicts."""
    if isinstance(value, str):
        return _SPACE.sub(" ", unicodedata.normalize("NFC", value)).strip()
    if isinstance(value, dict):
        return {_normal(k): _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def conversation_key(ex: Example) -> int:
    """A stable signed 64-bit hash of the normalized conversation (every turn, the tools; or the text):
    rows that differ only in whitespace or Unicode composition get the same key (exact dedup)."""
    doc = _normal({"text": ex.text} if ex.raw_text else {"turns": ex.turns, "tools": ex.tools})
    blob = json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "big", signed=True)

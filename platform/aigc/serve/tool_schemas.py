"""Tool calling in requests: ``tools``, ``tool_choice``, and the tool turns of a conversation, checked.

``tools`` is OpenAI's ``[{type: "function", function: {name, description?, parameters?}}]``: at most
:data:`MAX_TOOLS`, names non-empty, unique and made of letters, digits, ``_`` and ``-`` (OpenAI's rule, and what
keeps a name safe inside the JSON of a forced call). ``tool_choice`` is ``"auto"``, ``"none"``, ``"required"``
or ``{type: "function", function: {name}}`` naming one of ``tools``. A bad value is a 400 whose ``param`` is
``tools`` or ``tool_choice``. The legacy ``functions``/``function_call`` stay refused (schemas' unsupported
fields).

Messages: an assistant turn may carry ``tool_calls`` (its ``content`` may then be null), a ``tool`` turn carries
the result (``tool_call_id``, ``content``); content may be a list of text parts, joined. They become the
template messages training renders (:mod:`aigc.data.formats`): ``arguments`` as an object, ``content`` "" when
null.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MAX_TOOLS",
    "TOOLS_SCHEMA",
    "TOOL_CHOICE_SCHEMA",
    "ChoiceMode",
    "FunctionCall",
    "RequestToolCall",
    "TextPart",
    "ToolCall",
    "ToolCallDelta",
    "check_tool_choice",
    "check_tools",
    "template_message",
    "tool_choice_field",
    "tools_field",
]

MAX_TOOLS = 128  # OpenAI's cap; each tool's schema is rendered into every prompt
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

ChoiceMode = Literal["auto", "none", "required", "function"]  # "function": the one named


# What the OpenAPI schema states (what a JSON schema cannot: names unique, a named function among the tools).
_FUNCTION = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": _NAME.pattern},
        "description": {"type": "string"},
        "parameters": {"type": "object"},
    },
}
TOOLS_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {
            "type": "array",
            "maxItems": MAX_TOOLS,
            "items": {
                "type": "object",
                "required": ["type", "function"],
                "properties": {"type": {"enum": ["function"]}, "function": _FUNCTION},
            },
        },
        {"type": "null"},
    ]
}
TOOL_CHOICE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "enum": ["auto", "none", "required"]},
        {
            "type": "object",
            "required": ["type", "function"],
            "properties": {
                "type": {"enum": ["function"]},
                "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
            },
        },
        {"type": "null"},
    ]
}


class TextPart(BaseModel):
    """One part of a message's content given as a list: only text parts are accepted."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class _CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)
    arguments: str = Field(description="The call's arguments: a JSON object, as text.")


class RequestToolCall(BaseModel):
    """A call an earlier assistant turn made, as a client sends it back."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: _CalledFunction

    def as_template_dict(self) -> dict[str, Any]:
        """The call as the data layer trains it: ``arguments`` an object.

        Raises:
            ValueError: ``arguments`` is not a JSON object.
        """
        try:
            args = json.loads(self.function.arguments) if self.function.arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"function.arguments is not valid JSON ({exc.msg})") from None
        if not isinstance(args, dict):
            raise ValueError("function.arguments must be a JSON object")
        _check_text(args, "function.arguments")
        return {"type": "function", "function": {"name": self.function.name, "arguments": args}}


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)


class ToolCall(BaseModel):
    """A call in an answer: ``message.tool_calls[i]``."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(ToolCall):
    """A call in a streamed answer: ``delta.tool_calls[i]`` (sent whole, in one delta)."""

    index: int


def tools_field() -> Any:
    """The request's ``tools`` field (checked by :func:`check_tools`)."""
    return Field(None, json_schema_extra=TOOLS_SCHEMA, description="Functions the model may call: [{type: "
                 "function, function: {name, description?, parameters?}}], names unique.")  # fmt: skip


def tool_choice_field() -> Any:
    """The request's ``tool_choice`` field (checked by :func:`check_tool_choice`, also when left out)."""
    return Field(None, validate_default=True, json_schema_extra=TOOL_CHOICE_SCHEMA, description='"auto" (the '
                 'default with tools), "none", "required" or {type: function, function: {name}}.')  # fmt: skip


def template_message(
    role: str, text: str, calls: list[RequestToolCall] | None, call_id: str | None, name: str | None
) -> dict[str, Any]:
    """A message in the shape training renders (:mod:`aigc.data.formats`): an assistant's tool calls with object
    arguments, a tool result with its call id (and tool name)."""
    out: dict[str, Any] = {"role": role, "content": text}
    if calls and role == "assistant":  # only assistant turns make calls
        out["tool_calls"] = [c.as_template_dict() for c in calls]
    if role == "tool":
        out.update({k: v for k, v in (("tool_call_id", call_id), ("name", name)) if v})
    return out


def _check_text(value: Any, where: str) -> None:
    """JSON may carry lone surrogates ("\\ud800") that no tokenizer takes: refuse them here."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where} is not valid Unicode text (it holds a lone surrogate)") from None


def check_tools(value: Any) -> list[dict[str, Any]] | None:
    """``tools`` as the chat template takes them, or None for none (``null`` or ``[]``).

    Raises:
        ValueError: the message for a 400 naming ``tools``.
    """
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise ValueError(f"must be a list of tools, got {type(value).__name__}")
    if len(value) > MAX_TOOLS:
        raise ValueError(f"at most {MAX_TOOLS} tools, got {len(value)}")
    out, seen = [], set()
    for i, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ValueError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}')
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in seen:
            raise ValueError(f"tools[{i}].function.name {name!r} is given twice: tool names must be unique")
        if not isinstance(fn.get("description", ""), str):
            raise ValueError(f"tools[{i}].function.description must be a string")
        if not isinstance(fn.get("parameters", {}), dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        _check_text(fn, f"tools[{i}].function")
        seen.add(name)
        kept = {k: fn[k] for k in ("name", "description", "parameters") if k in fn}
        out.append({"type": "function", "function": kept})
    return out


def check_tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> tuple[ChoiceMode, str | None]:
    """``tool_choice`` as (mode, the named function's name or None).

    Without ``tools``, only ``"none"`` and ``"auto"`` (which then means none) are accepted.

    Raises:
        ValueError: the message for a 400 naming ``tool_choice``.
    """
    if value is None:
        return ("auto" if tools else "none"), None
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise ValueError(f'must be "auto", "none", "required" or {{"type": "function", ...}}, got {value!r}')
        if value == "required" and not tools:
            raise ValueError('"required" needs tools: send the functions the model may call in "tools"')
        return (value if tools else "none"), None
    fn = value.get("function") if isinstance(value, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name, str):
        raise ValueError('must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}')
    names = [t["function"]["name"] for t in tools or []]
    if name not in names:
        known = ", ".join(names) if names else "no tools were sent"
        raise ValueError(f"names the function {name!r}, which is not in tools ({known})")
    return "function", name

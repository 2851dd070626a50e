"""Tool calls in chat answers: the request's plan, parsing the model's text into ``tool_calls``, streamed or whole.

Plan (:func:`plan_tools`): with ``tools`` and a ``tool_choice`` other than ``none``, the conversation goes to the
generator as a :class:`~aigc.serve.engine.tool_prompts.ToolPrompt`, rendered by the model's chat template with
``tools=`` exactly as training renders it. ``required`` and a named function end the prompt with the template's
call opening (:meth:`~aigc.serve.engine.tool_prompts.ToolSyntax.opening`), so the answer continues a call.
``none`` renders no tools and parses nothing. A template that ignores ``tools``, or whose call syntax is not one
parsed here, is refused (400, ``param: tools``) rather than silently answering without tools.

Parse (:func:`parse_calls`): ``hermes`` answers hold ``<tool_call>{"name", "arguments"}</tool_call>`` blocks
(several allowed; the text around them is the content), ``llama3`` answers are one or more JSON objects
``{"name", "parameters"}`` (``;``-separated), optionally after ``<|python_tag|>``. Every call must name one of
the request's tools with an object of arguments; anything else (bad JSON, an unknown name, a cut-off call) is no
call at all: the text is the answer's content, with its usual ``finish_reason``.

Stream (:class:`ToolCallStream`): text passes through as content until it could be a call (the ``hermes``
marker, or a ``llama3`` answer starting with ``{``); from there it is held, parsed when the generation ends and
sent as one ``tool_calls`` delta per call (its arguments in one piece), or as content when it does not parse.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aigc.serve.api_errors import ApiError
from aigc.serve.engine.tool_prompts import ToolFormat, ToolPrompt, ToolSyntax
from aigc.serve.engine.types import TokenLogprob
from aigc.serve.logprob_shapes import chat_logprobs
from aigc.serve.responses import AssistantMessage, ChatChoice, ChatChunkChoice, ChatDelta
from aigc.serve.tool_schemas import FunctionCall, ToolCall, ToolCallDelta

__all__ = ["ToolCallStream", "ToolCalls", "answer_choice", "parse_calls", "plan_tools"]

_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_HERMES_BLOCK = re.compile(re.escape(_HERMES_OPEN) + r"(.*?)(?:" + re.escape(_HERMES_CLOSE) + r"|\Z)", re.S)


@dataclass(frozen=True)
class ToolCalls:
    """How one request's answer is parsed: the template's call syntax, the callable names, the forced opening."""

    format: ToolFormat
    names: frozenset[str]
    opening: str = ""


def plan_tools(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    choice: tuple[str, str | None],
    syntax: ToolSyntax | None,
) -> tuple[list[dict[str, Any]], ToolCalls | None]:
    """The prompt to generate from, and how to parse its answer (None: plain text).

    Args:
        messages: the conversation as template messages.
        tools: the request's checked ``tools`` (None: none).
        choice: the checked ``tool_choice``: (mode, the named function or None).
        syntax: what the model's chat template does with tools (needed only when tools are used).

    Raises:
        ApiError: 400 naming ``tools`` when the template does not render tools or writes no syntax parsed here.
    """
    mode, name = choice
    if not tools or mode == "none":
        return messages, None
    assert syntax is not None
    if not syntax.renders_tools:
        raise ApiError(400, "this model's chat template does not render tools, so the model would never see them; "
                       "send the request without tools, or serve a model whose template renders tools=",
                       param="tools", code="tools_not_supported")  # fmt: skip
    if syntax.format is None:
        raise ApiError(400, "this model's chat template writes tool calls in a syntax this server cannot parse "
                       "(known: <tool_call> JSON as Hermes/Qwen write it, Llama-3 JSON); send the request without "
                       "tools", param="tools", code="tools_not_supported")  # fmt: skip
    opening = syntax.opening(name) if mode in ("required", "function") else ""
    names = frozenset([name] if name else [t["function"]["name"] for t in tools])
    return ToolPrompt(messages, tools, opening), ToolCalls(syntax.format, names, opening)


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _one_call(obj: Any, args_key: str, names: frozenset[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    text = json.dumps(args, ensure_ascii=False)
    return ToolCall(id=_call_id(), function=FunctionCall(name=obj["name"], arguments=text))


def _parse_hermes(text: str, names: frozenset[str]) -> tuple[str | None, list[ToolCall]] | None:
    blocks = list(_HERMES_BLOCK.finditer(text))
    if not blocks:
        return None
    calls = []
    for b in blocks:
        try:
            call = _one_call(json.loads(b.group(1).strip()), "arguments", names)
        except json.JSONDecodeError:
            return None
        if call is None:
            return None
        calls.append(call)
    content = _HERMES_BLOCK.sub("", text).strip()
    return (content or None), calls


def _parse_llama3(text: str, names: frozenset[str]) -> tuple[str | None, list[ToolCall]] | None:
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    if not body.startswith("{"):
        return None
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            obj, end = decoder.raw_decode(body, at)
        except json.JSONDecodeError:
            return None
        call = _one_call(obj, "parameters", names)
        if call is None:
            return None
        calls.append(call)
        at = end
        while at < len(body) and body[at] in " \t\r\n;":  # Llama 3 separates several calls with ";"
            at += 1
    return None, calls


def _parse(full: str, tools: ToolCalls) -> tuple[str | None, list[ToolCall]] | None:
    return (_parse_hermes if tools.format == "hermes" else _parse_llama3)(full, tools.names)


def parse_calls(text: str, tools: ToolCalls) -> tuple[str | None, list[ToolCall]] | None:
    """``(content, calls)`` from a whole answer (the forced opening put back in front), or None for no call."""
    return _parse(tools.opening + text, tools)


class ToolCallStream:
    """Splits a streamed answer into content sent at once and a held tail that may be calls (module doc)."""

    def __init__(self, tools: ToolCalls):
        self._tools = tools
        self._held = tools.opening  # a forced call is held from its first character
        self._holding = bool(tools.opening)
        self._passing = False  # llama3: the answer is plain text, nothing more to watch
        self._sent = False  # some content was sent

    def push(self, text: str) -> str:
        """The content that can be sent now (leading whitespace waits: it may come before a call)."""
        if self._holding:
            self._held += text
            return ""
        if self._passing:
            return text
        self._held += text
        if not self._held.strip():
            return ""
        if self._tools.format == "hermes":
            at = self._held.find(_HERMES_OPEN)
            cut = at if at >= 0 else len(self._held) - _partial_suffix(self._held, _HERMES_OPEN)
            if not self._sent and not self._held[:cut].strip():
                cut = 0  # only whitespace before the call: it belongs to the call's (stripped) surroundings
            out, self._held, self._holding = self._held[:cut], self._held[cut:], at >= 0
            self._sent = self._sent or bool(out)
            return out
        start = self._held.lstrip()
        if start.startswith("{") or start.startswith(_PYTHON_TAG):
            self._holding = True
            return ""
        if _PYTHON_TAG.startswith(start):  # "<|python" could still become the tag
            return ""
        out, self._held, self._passing = self._held, "", True
        return out

    def close(self, reason: str) -> tuple[list[ChatChunkChoice], str]:
        """At the end of the generation: the choices still to send (held content, then one delta per call) and
        the finish reason (``tool_calls`` when calls parsed). A flagged answer sends what it held as content."""
        held, self._held = self._held, ""
        parsed = None if reason == "content_filter" or not held else _parse(held, self._tools)
        if parsed is None:
            return ([ChatChunkChoice(delta=ChatDelta(content=held))] if held else []), reason
        content, calls = parsed
        out = [ChatChunkChoice(delta=ChatDelta(content=content))] if content else []
        for i, c in enumerate(calls):
            out.append(ChatChunkChoice(delta=ChatDelta(tool_calls=[ToolCallDelta(index=i, **c.model_dump())])))
        return out, "tool_calls"


def answer_choice(
    text: str, reason: str, tools: ToolCalls, index: int = 0, logprobs: Sequence[TokenLogprob] | None = None
) -> ChatChoice:
    """The non-streamed choice: the parsed calls (``finish_reason: tool_calls``), or the text as content; with
    its ``index`` among ``n`` choices and the log-probabilities of its tokens."""
    lp = chat_logprobs(logprobs)
    parsed = None if reason == "content_filter" else parse_calls(text, tools)
    if parsed is None:
        message = AssistantMessage(content=tools.opening + text)
        return ChatChoice(index=index, message=message, finish_reason=reason, logprobs=lp)
    content, calls = parsed
    message = AssistantMessage(content=content, tool_calls=calls)
    return ChatChoice(index=index, message=message, finish_reason="tool_calls", logprobs=lp)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0

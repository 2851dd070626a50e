"""Conversations with tools: which tool-call syntax a chat template teaches, and the prompt that forces a call.

A chat template that renders ``tools`` teaches the model one way of writing a call. Two families are known
(the ones the data layer trains):

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one or several (Hermes, Qwen 2/2.5/3,
  and this project's default template);
- ``llama3``: a bare JSON object ``{"name": ..., "parameters": {...}}``, optionally after ``<|python_tag|>``
  (Llama 3.1/3.2/3.3).

The family is read from the template's text (:func:`tool_syntax`). ``tool_choice: required`` or a named
function is made real by ending the prompt with the family's call opening (:meth:`ToolSyntax.opening`): the
model's answer then continues a call instead of choosing whether to make one. The opening is prompt, not
answer; the parser puts it back in front of the answer (:mod:`aigc.serve.tool_calls`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from aigc.data.templates import render_prompt

__all__ = ["ToolFormat", "ToolPrompt", "ToolSyntax", "tool_syntax"]

ToolFormat = Literal["hermes", "llama3"]

_PROBE_TOOL = {"type": "function", "function": {"name": "aigc_probe_tool", "description": "probe", "parameters": {}}}


class ToolPrompt(list):
    """A conversation (a list of template messages) with the tools it may call and the text the assistant's
    answer is forced to start with (``opening``; "" when the model chooses freely).

    A list, so whatever reads a conversation (moderation, capture) reads it unchanged.
    """

    def __init__(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, opening: str = ""):
        super().__init__(messages)
        self.tools = tools
        self.opening = opening

    def __reduce__(self) -> tuple[Any, ...]:  # crosses Ray (pickle) with its attributes
        return (ToolPrompt, (list(self), self.tools, self.opening))


@dataclass(frozen=True)
class ToolSyntax:
    """What a chat template does with tools: whether it renders them, and the call syntax it writes."""

    renders_tools: bool
    format: ToolFormat | None = None
    marker_newline: bool = False  # Hermes/Qwen write "<tool_call>\n{...}\n</tool_call>"; some write no newline

    def opening(self, name: str | None) -> str:
        """The text a forced call starts with: the call marker, and with ``name`` the named function's head.

        ``hermes``: ``<tool_call>`` (then ``{"name": "NAME", "arguments": ``); ``llama3``: ``{"name": `` (then
        ``"NAME", "parameters": ``).
        """
        if self.format == "hermes":
            head = "<tool_call>\n" if self.marker_newline else "<tool_call>"
            return head + (f'{{"name": {json.dumps(name)}, "arguments": ' if name else "")
        if self.format == "llama3":
            return '{"name": ' + (f'{json.dumps(name)}, "parameters": ' if name else "")
        return ""


def tool_syntax(tokenizer: Any) -> ToolSyntax:
    """The tokenizer's chat template's :class:`ToolSyntax` (renders one probe conversation)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    text = template if isinstance(template, str) else " ".join(template.values())
    msgs = [{"role": "user", "content": "hi"}]
    try:
        renders = render_prompt(tokenizer, msgs, [_PROBE_TOOL]) != render_prompt(tokenizer, msgs)
    except Exception:  # a template that fails on a plain user turn with tools does not serve tools
        renders = False
    if "<tool_call>" in text:
        newline = "<tool_call>\\n" in text or "<tool_call>\n" in text
        return ToolSyntax(renders, "hermes", newline)
    if "<|python_tag|>" in text or '"parameters"' in text:
        return ToolSyntax(renders, "llama3")
    return ToolSyntax(renders)

"""The two endpoints' response shapes: chat and text completions differ only in these (and SSE framing)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel

from aigc.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
)

__all__ = ["CHAT", "TEXT", "FinishReason", "Kind", "sse"]

FinishReason = Literal["stop", "length", "content_filter"]


def sse(payload: Any) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


# ------------------------------------------------------------------------------- the two endpoints' shapes
class Kind(NamedTuple):
    """How one endpoint shapes a generation: the only difference between chat and text completions."""

    id_prefix: str
    response: type[BaseModel]  # the whole answer: (model, choices, usage)
    chunk: type[BaseModel]  # one streamed event: (id, created, model, choices, usage)
    answer: Callable[[str, FinishReason], BaseModel]  # the non-streamed choice
    delta: Callable[[str | None, FinishReason | None], BaseModel]  # a streamed choice: text, or the finish
    opening: Callable[[], BaseModel] | None  # a choice streamed before the first token, if any


def _chat_answer(text: str, finish_reason: FinishReason) -> ChatChoice:
    return ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)


def _chat_delta(text: str | None, finish_reason: FinishReason | None) -> ChatChunkChoice:
    # The finish chunk's delta is empty ({}), as OpenAI sends it.
    return ChatChunkChoice(delta=ChatDelta(content=text), finish_reason=finish_reason)


def _chat_opening() -> ChatChunkChoice:
    return ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))


def _text_choice(text: str | None, finish_reason: FinishReason | None) -> CompletionChoice:
    return CompletionChoice(text=text or "", finish_reason=finish_reason)


CHAT = Kind("chatcmpl", ChatCompletionResponse, ChatCompletionChunk, _chat_answer, _chat_delta, _chat_opening)
TEXT = Kind("cmpl", CompletionResponse, CompletionChunk, _text_choice, _text_choice, None)

"""The two endpoints' response shapes: chat and text completions differ only in these (and SSE framing)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel

from aigc.serve.engine.types import TokenLogprob
from aigc.serve.logprob_shapes import chat_logprobs, text_logprobs
from aigc.serve.responses import (
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
    # Choices take keywords ``index`` (which of the n) and ``logprobs`` (the tokens of their text, or None).
    answer: Callable[..., BaseModel]  # the non-streamed choice: (text, finish_reason)
    delta: Callable[..., BaseModel]  # a streamed choice: (text, None), or (None, finish_reason)
    opening: Callable[..., BaseModel] | None  # a choice streamed before the first token, if any: (index=)


Logprobs = Sequence[TokenLogprob] | None


def _chat_answer(text: str, finish_reason: FinishReason, index: int = 0, logprobs: Logprobs = None) -> ChatChoice:
    return ChatChoice(index=index, message=AssistantMessage(content=text), finish_reason=finish_reason,
                      logprobs=chat_logprobs(logprobs))  # fmt: skip


def _chat_delta(
    text: str | None, finish_reason: FinishReason | None, index: int = 0, logprobs: Logprobs = None
) -> ChatChunkChoice:
    # The finish chunk's delta is empty ({}), as OpenAI sends it.
    return ChatChunkChoice(index=index, delta=ChatDelta(content=text), finish_reason=finish_reason,
                           logprobs=chat_logprobs(logprobs))  # fmt: skip


def _chat_opening(index: int = 0) -> ChatChunkChoice:
    return ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))


def _text_choice(
    text: str | None, finish_reason: FinishReason | None, index: int = 0, logprobs: Logprobs = None
) -> CompletionChoice:
    return CompletionChoice(index=index, text=text or "", finish_reason=finish_reason,
                            logprobs=text_logprobs(logprobs))  # fmt: skip


CHAT = Kind("chatcmpl", ChatCompletionResponse, ChatCompletionChunk, _chat_answer, _chat_delta, _chat_opening)
TEXT = Kind("cmpl", CompletionResponse, CompletionChunk, _text_choice, _text_choice, None)

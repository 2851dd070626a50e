"""What callers hand the engine and get back: sampling settings, prompts, whole completions and streamed deltas."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Completion", "Delta", "FinishReason", "Prompt", "SamplingParams", "join_deltas"]

FinishReason = Literal["stop", "length"]
# A prompt is raw text (completions) or a conversation rendered by the chat template (chat completions).
Prompt = str | Sequence[dict[str, str]]


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: ``temperature == 0`` is greedy; ``top_k == 0`` means no top-k cut."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    """A finished generation; ``text`` excludes the eos token and anything from a stop string on."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Delta:
    """One streamed piece of text, with the token counts so far; the last delta has ``finish_reason`` set."""

    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def join_deltas(first: Delta, then: Delta | BaseException) -> Delta | BaseException:
    """Two consecutive deltas as one (an error wins: the request fails either way)."""
    if isinstance(then, BaseException):
        return then
    return Delta(first.text + then.text, then.finish_reason, then.prompt_tokens, then.completion_tokens)

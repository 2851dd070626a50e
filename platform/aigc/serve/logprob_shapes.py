"""Log-probabilities in OpenAI's two shapes: chat's ``logprobs.content`` list and completions' parallel lists.

The figures come from the engine (:mod:`aigc.serve.engine.logprobs`: the model's raw distribution, finite, one
entry per generated token whose text was sent). ``bytes`` are the token's own bytes: joined over a reply's tokens
they are the reply's UTF-8, even where a token is part of a multi-byte character (its ``token`` text is then
U+FFFD, as the tokenizer decodes it alone).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from aigc.serve.engine.types import TokenLogprob, TopLogprob

__all__ = [
    "ChatLogprobs",
    "ChatTokenLogprob",
    "ChatTopLogprob",
    "CompletionLogprobs",
    "chat_logprobs",
    "sent_logprobs",
    "text_logprobs",
]


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


def _bytes(t: TokenLogprob | TopLogprob) -> list[int]:
    return list(t.raw or t.token.encode("utf-8"))


def chat_logprobs(lps: Sequence[TokenLogprob] | None) -> ChatLogprobs | None:
    """Chat's ``choices[i].logprobs`` (None when the request did not ask)."""
    if lps is None:
        return None
    content = [
        ChatTokenLogprob(
            token=t.token,
            logprob=t.logprob,
            bytes=_bytes(t),
            top_logprobs=[ChatTopLogprob(token=a.token, logprob=a.logprob, bytes=_bytes(a)) for a in t.top],
        )
        for t in lps
    ]
    return ChatLogprobs(content=content)


def text_logprobs(lps: Sequence[TokenLogprob] | None) -> CompletionLogprobs | None:
    """Completions' ``choices[i].logprobs``: ``text_offset`` is where each token's text starts in the choice's
    whole text (in streamed chunks too). Alternatives with the same text keep the likelier figure."""
    if lps is None:
        return None
    tops = []
    for t in lps:
        top: dict[str, float] = {}
        for a in t.top:  # most likely first
            top.setdefault(a.token, a.logprob)
        tops.append(top)
    return CompletionLogprobs(
        tokens=[t.token for t in lps],
        token_logprobs=[t.logprob for t in lps],
        top_logprobs=tops,
        text_offset=[t.offset for t in lps],
    )


def sent_logprobs(lps: Sequence[TokenLogprob] | None, sent_chars: int) -> list[TokenLogprob] | None:
    """The tokens whose text starts within the first ``sent_chars`` characters (an answer the content filter
    cut reports no token past the cut)."""
    return None if lps is None else [t for t in lps if t.offset < sent_chars]

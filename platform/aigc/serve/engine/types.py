"""What callers hand the engine and get back: sampling settings, prompts, whole completions and streamed deltas."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "MAX_CHOICES",
    "MAX_TOP_LOGPROBS",
    "Choice",
    "Collector",
    "Completion",
    "Delta",
    "FinishReason",
    "Prompt",
    "ResponseFormat",
    "SamplingParams",
    "TokenLogprob",
    "TopLogprob",
    "join_deltas",
]

FinishReason = Literal["stop", "length"]
# A prompt is raw text (completions) or a conversation rendered by the chat template (chat completions).
Prompt = str | Sequence[dict[str, str]]
MAX_CHOICES = 8  # n: choices per request share one prefill; each is a row of the batch
MAX_TOP_LOGPROBS = 20  # alternatives reported per token at most


@dataclass(frozen=True)
class ResponseFormat:
    """What a row's output must be: ``json_object`` (any JSON object) or ``json_schema`` (``schema``: the JSON
    Schema as JSON text, the cache key of its compiled grammar; its keys keep their order, as the properties are
    written in the schema's order)."""

    type: Literal["json_object", "json_schema"]
    schema: str | None = None

    @property
    def schema_text(self) -> str:
        return self.schema if self.type == "json_schema" and self.schema is not None else '{"type": "object"}'


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: ``temperature == 0`` is greedy; ``top_k == 0`` means no top-k cut.

    ``logprobs``: None = no log-probabilities; k >= 0 = each generated token's log-probability and its k most
    likely alternatives (the model's raw distribution: log-softmax of the logits, before temperature, top-k and
    top-p; for a row with a ``response_format``, of the logits after the grammar's mask: the distribution the
    token was drawn from, before temperature). ``n``: choices generated from one prefill of the prompt; with a
    ``seed``, choice ``i`` samples with ``seed + i``. ``response_format``: the output must be JSON
    (:mod:`aigc.serve.engine.grammar`); None = free text.
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    n: int = 1
    response_format: ResponseFormat | None = None


@dataclass(frozen=True)
class TopLogprob:
    """One alternative for a generated token: its id, its text (the token decoded alone) and log-probability."""

    token_id: int
    token: str
    logprob: float
    raw: bytes = b""  # the token's own bytes (joined over a reply's tokens: the reply's UTF-8)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability, where its text starts in the choice's text, and its alternatives.

    A token decoded alone may be part of a multi-byte character (its ``token`` then holds U+FFFD, and ``raw``
    its real bytes); ``offset`` is the character its bytes belong to. Log-probabilities are finite: a token the
    model rules out entirely (``-inf``) is reported as -9999.0, as OpenAI does.
    """

    token_id: int
    token: str
    logprob: float
    offset: int
    top: tuple[TopLogprob, ...] = ()
    raw: bytes = b""


@dataclass
class Choice:
    """One of a request's ``n`` generations (``completion_tokens``: this choice's own)."""

    index: int
    text: str
    finish_reason: FinishReason
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    """A finished generation; ``text`` excludes the eos token and anything from a stop string on.

    ``text``, ``finish_reason`` and ``logprobs`` are the first choice's; ``completion_tokens`` counts every
    choice's tokens (the prompt is counted once); ``choices`` holds all ``n`` in index order.
    """

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    choices: list[Choice] = field(default_factory=list)


@dataclass
class Delta:
    """One streamed piece of choice ``index``'s text, with its token counts so far (``completion_tokens``: this
    choice's); each choice's last delta has ``finish_reason`` set. ``logprobs``: the tokens whose text starts in
    the text sent so far and were not reported before (None when not asked for)."""

    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    index: int = 0
    logprobs: list[TokenLogprob] | None = None


def join_deltas(first: Delta, then: Delta | BaseException) -> Delta | BaseException:
    """Two consecutive deltas of one choice as one (an error wins: the request fails either way)."""
    if isinstance(then, BaseException):
        return then
    lps = None
    if first.logprobs is not None or then.logprobs is not None:
        lps = [*(first.logprobs or ()), *(then.logprobs or ())]
    return Delta(first.text + then.text, then.finish_reason, then.prompt_tokens, then.completion_tokens,
                 then.index, lps)  # fmt: skip


class Collector:
    """Builds a :class:`Completion` from a request's deltas (every choice's, in any interleaving)."""

    def __init__(self, n: int):
        self.n = n
        self._text: list[list[str]] = [[] for _ in range(n)]
        self._logprobs: list[list[TokenLogprob] | None] = [None] * n
        self._final: dict[int, Delta] = {}

    def add(self, d: Delta) -> Completion | None:
        """Take one delta; the whole completion once every choice has finished, else None."""
        self._text[d.index].append(d.text)
        if d.logprobs is not None:
            self._logprobs[d.index] = [*(self._logprobs[d.index] or ()), *d.logprobs]
        if d.finish_reason is None:
            return None
        self._final[d.index] = d
        if len(self._final) < self.n:
            return None
        choices = [
            Choice(
                i,
                "".join(self._text[i]),
                self._final[i].finish_reason,
                self._final[i].completion_tokens,
                self._logprobs[i],
            )
            for i in range(self.n)
        ]
        total = sum(c.completion_tokens for c in choices)
        first = choices[0]
        return Completion(first.text, first.finish_reason, self._final[0].prompt_tokens, total, first.logprobs,
                          choices)  # fmt: skip

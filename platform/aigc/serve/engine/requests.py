"""One request inside the engine: its token ids, settings, deadline and where its output goes.

:func:`prepare` runs on the caller's thread (off the event loop): it renders and tokenizes the prompt and
refuses what could never be served (empty, too long, a seed torch cannot take), so the engine thread only
ever sees requests it can run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from aigc.errors import InvalidRequestError, RequestTimeoutError
from aigc.serve.engine.adapters import BASE_ADAPTER
from aigc.serve.engine.prompts import PromptEncoder
from aigc.serve.engine.types import MAX_CHOICES, MAX_TOP_LOGPROBS, Delta, Prompt, SamplingParams

__all__ = ["Request", "prepare", "timeout_error"]


def timeout_error() -> RequestTimeoutError:
    """The error a request past its deadline ends with."""
    return RequestTimeoutError(
        "the request did not finish within this server's time limit (serve.request_timeout_s); "
        "ask for fewer tokens or retry later",
        code="request_timeout",
    )


@dataclass(eq=False)
class Request:
    """A request (or one of its ``n`` choices, :meth:`fork`) as the engine thread tracks it."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str
    deadline: float | None = None  # time.monotonic() after which the request ends with RequestTimeoutError
    sink: Callable[[Delta | BaseException], None] = lambda item: None
    cancel: threading.Event = field(default_factory=threading.Event)
    detok: Any = None
    stops: Any = None
    logprobs: Any = None  # a LogprobTracker when the request asked for log-probabilities
    grammar: Any = None  # the compiled response_format (shared by the request's choices), or None
    matcher: Any = None  # this choice's grammar matcher, made when it joins the batch
    done: bool = False
    arrived: float = field(default_factory=time.monotonic)
    index: int = 0  # which of the request's n choices this is

    def finish(self, item: Delta | BaseException) -> None:
        """Send the last item (a final delta or the error that ends the request) exactly once."""
        if not self.done:
            self.done = True
            self.sink(item)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def fork(self) -> list[Request]:
        """The request's ``n`` choices: one sink, one cancel event and one deadline, each its own text and
        state; with a seed, choice ``i`` samples with ``seed + i`` (distinct, and the same on every run)."""
        n, seed = self.params.n, self.params.seed
        if n == 1:
            return [self]
        return [
            replace(self, index=i, params=replace(self.params, seed=None if seed is None else (seed + i) % 2**63))
            for i in range(n)
        ]


def prepare(
    encoder: PromptEncoder,
    prompt: Prompt,
    params: SamplingParams,
    adapter: str | None,
    *,
    max_prompt_tokens: int | None,
    max_context: int | None,
    timeout_s: float | None = None,
    grammars: Any = None,
) -> Request:
    """Render and tokenize ``prompt``; refuse what the engine could not serve; compile the response format
    (``grammars``: the engine's :class:`~aigc.serve.engine.grammar.Grammars`).

    Raises:
        InvalidRequestError: an empty or too-long prompt, text the tokenizer cannot read as plain text, a
            conversation the chat template rejects, a seed out of range, or a response format that cannot be
            enforced.
    """
    # A chat template writes its own special tokens (bos...); raw prompts get the tokenizer's usual ones.
    param = "prompt" if isinstance(prompt, str) else "messages"
    ids = encoder.encode(prompt if isinstance(prompt, str | list) else list(prompt))  # a ToolPrompt stays one
    if not ids:
        raise InvalidRequestError("the prompt is empty", param=param)
    if params.seed is not None and not 0 <= params.seed < 2**63:  # on the engine thread it would fail the row
        raise InvalidRequestError(f"seed must be >= 0 and < 2**63, got {params.seed}", param="seed")
    if not 1 <= params.n <= MAX_CHOICES:
        raise InvalidRequestError(f"n must be between 1 and {MAX_CHOICES}, got {params.n}", param="n")
    if params.logprobs is not None and not 0 <= params.logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(
            f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {params.logprobs}", param="top_logprobs"
        )
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        raise InvalidRequestError(
            f"the prompt has {len(ids)} tokens; this server accepts at most {max_prompt_tokens}",
            param=param,
            code="prompt_too_long",
        )
    if max_context is not None and len(ids) + params.max_tokens > max_context:
        raise InvalidRequestError(
            f"this model's context is {max_context} tokens; the prompt has {len(ids)} and max_tokens asks "
            f"for {params.max_tokens} more. Shorten the prompt or lower max_tokens.",
            param=param,
            code="context_length_exceeded",
        )
    grammar = None
    if params.response_format is not None:
        if grammars is None:
            raise InvalidRequestError("this engine does not enforce response formats", param="response_format")
        grammar = grammars.compile(params.response_format)  # once per distinct format (cached)
    deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
    return Request(prompt_ids=list(ids), params=params, adapter=adapter or BASE_ADAPTER, deadline=deadline,
                   grammar=grammar)  # fmt: skip

"""Answering one request in its endpoint's OpenAI shape, once the generator has it: a whole JSON answer, or
server-sent events as tokens arrive.

On the way out an answer is checked against the content policy (a streamed one piece by piece, holding back a
tail that could still become a flagged phrase: :class:`~aigc.serve.moderation.OutputGuard`), captured for
feedback before it leaves (so feedback can follow at once), counted in the usage metrics and against the key's
token limits (:class:`~aigc.serve.quota.Admission`). An error after the status line is sent is reported in-band,
as OpenAI does, and every stream ends with ``data: [DONE]``.

With ``n`` > 1, every choice is checked on its own (a flagged choice ends with ``content_filter``, the others go
on); usage counts the prompt once and every choice's tokens; the first choice (``index`` 0) is the one captured
for feedback. Log-probabilities leave with the text they belong to: none for text the content filter cut.

With tools (:mod:`aigc.serve.tool_calls`), each choice's text streams until it could be a tool call; then it is
held, and sent at the end as ``tool_calls`` (``finish_reason: tool_calls``) or, when it does not parse, as
content. Capture records the model's text.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from aigc.serve.api_errors import api_error_from
from aigc.serve.engine import Completion, Delta, Prompt, SamplingParams
from aigc.serve.engine.types import Choice, TokenLogprob
from aigc.serve.feedback import FeedbackCapture
from aigc.serve.logprob_shapes import sent_logprobs
from aigc.serve.metrics import ingress_metrics
from aigc.serve.moderation import OutputGuard, Policy
from aigc.serve.quota import Admission
from aigc.serve.responses import Usage, error_body
from aigc.serve.shapes import FinishReason, Kind, sse
from aigc.serve.tool_calls import ToolCalls, ToolCallStream, answer_choice

__all__ = ["Answerer", "Turn"]


@dataclass(frozen=True)
class Turn:
    """One admitted request, as its answer needs it."""

    kind: Kind
    rid: str  # the response id feedback refers to
    model_name: str  # the response's ``model``: the base model id or the resolved ``name:vN``
    prompt: Prompt
    params: SamplingParams
    key: str | None  # the key's name (never the key)
    admission: Admission
    include_usage: bool = False  # a streamed answer ends with a usage chunk
    tools: ToolCalls | None = None  # parse the answer's tool calls (:mod:`aigc.serve.tool_calls`)


@dataclass
class _Streamed:
    """One choice of a streamed answer: its guard, the text sent, log-probabilities waiting for their text."""

    guard: OutputGuard | None
    calls: ToolCallStream | None = None  # holds what may be tool calls
    text: list[str] = field(default_factory=list)
    sent: int = 0
    waiting: list[TokenLogprob] = field(default_factory=list)
    last: Delta = field(default_factory=Delta)  # the latest delta with token counts
    reason: FinishReason | None = None  # set once the choice finished (tool_calls when calls parsed)
    model_reason: FinishReason | None = None  # the engine's (or the content filter's) reason, as captured

    def ready(self) -> list[TokenLogprob]:
        """The waiting tokens whose text starts within the text sent."""
        out = [t for t in self.waiting if t.offset < self.sent]
        self.waiting = self.waiting[len(out) :]
        return out


class Answerer:
    """Shapes, checks, captures and counts answers for one ingress replica.

    Args:
        policy: the content policy; None = no checks.
        check_outputs: whether answers are checked against ``policy``.
        holdback_chars: the streamed tail held back until it cannot become a flagged phrase.
        feedback: where answers are captured; None = capture off.
    """

    def __init__(self, policy: Policy | None, check_outputs: bool, holdback_chars: int,
                 feedback: FeedbackCapture | None):  # fmt: skip
        self._policy = policy
        self._check = policy is not None and check_outputs
        self._holdback = holdback_chars
        self._feedback = feedback

    def moderate(self, text: str, reason: FinishReason) -> tuple[str, FinishReason]:
        """A whole answer cut before its first flagged span, with ``finish_reason`` content_filter."""
        flag = self._policy.check(text) if self._check else None
        if flag is None:
            return text, reason
        ingress_metrics().content_filter("answer", flag.category)
        return text[: flag.start], "content_filter"

    async def whole(self, turn: Turn, out: Completion) -> JSONResponse:
        """The non-streamed answer (the generation is done)."""
        await turn.admission.finish(out.prompt_tokens, out.completion_tokens)
        ingress_metrics().usage(turn.model_name, out.prompt_tokens, out.completion_tokens)
        choices, captured = [], None
        for c in out.choices or [Choice(0, out.text, out.finish_reason, out.completion_tokens, out.logprobs)]:
            text, reason = self.moderate(c.text, c.finish_reason)
            captured = captured or (text, reason)
            logprobs = sent_logprobs(c.logprobs, len(text))
            if turn.tools is None:
                choices.append(turn.kind.answer(text, reason, index=c.index, logprobs=logprobs))
            else:  # the calls parsed from the text, or the text as content
                choices.append(answer_choice(text, reason, turn.tools, index=c.index, logprobs=logprobs))
        if self._feedback:  # stored before the answer leaves, so feedback can follow at once
            await self._feedback.capture(turn.rid, turn.model_name, turn.prompt, turn.params, *captured, turn.key)
        usage = Usage.of(out.prompt_tokens, out.completion_tokens)
        body = turn.kind.response(id=turn.rid, model=turn.model_name, choices=choices, usage=usage).model_dump()
        return JSONResponse(body, headers=turn.admission.headers)

    def stream(self, turn: Turn, deltas: AsyncIterator[Delta]) -> StreamingResponse:
        """The streamed answer: events as ``deltas`` arrive; leaving early (a flagged answer, the client gone)
        closes ``deltas``, which stops the generation, and ends the key's request."""
        kind, admission, metrics = turn.kind, turn.admission, ingress_metrics()
        head = {"id": turn.rid, "created": int(time.time()), "model": turn.model_name}
        n, asked = turn.params.n, turn.params.logprobs is not None
        streams = [
            _Streamed(OutputGuard(self._policy, self._holdback) if self._check else None,
                      ToolCallStream(turn.tools) if turn.tools else None)
            for _ in range(n)
        ]  # fmt: skip
        started, first = time.perf_counter(), None

        def chunk(choices: list[Any], usage: Usage | None = None) -> str:
            return sse(kind.chunk(**head, choices=choices, usage=usage).model_dump())

        def counts() -> tuple[int, int]:
            """(prompt tokens, completion tokens of every choice) so far."""
            return streams[0].last.prompt_tokens, sum(s.last.completion_tokens for s in streams)

        async def finish(last: str) -> list[str]:
            """The closing events once every choice finished (``last``: the last choice's finish chunk); the answer
            is captured before they leave, as a whole answer is."""
            if self._feedback:
                await self._feedback.capture(turn.rid, turn.model_name, turn.prompt, turn.params,
                                             "".join(streams[0].text), streams[0].model_reason, turn.key)  # fmt: skip
            prompt_tokens, completion_tokens = counts()
            await admission.finish(prompt_tokens, completion_tokens)
            metrics.usage(turn.model_name, prompt_tokens, completion_tokens)
            if first is not None:
                metrics.timing(turn.model_name, first - started, time.perf_counter() - started, completion_tokens)
            if turn.include_usage:  # OpenAI's last chunk: no choices, the usage
                return [last, chunk([], Usage.of(prompt_tokens, completion_tokens))]
            return [last]

        async def events() -> AsyncIterator[str]:
            nonlocal first
            if kind.opening is not None:
                for i in range(n):
                    yield chunk([kind.opening(index=i)])
            try:
                async with contextlib.aclosing(deltas):
                    async for d in deltas:
                        s = streams[d.index]
                        if s.reason is not None:  # a choice the content filter ended: the rest is dropped
                            continue
                        s.last = d if d.prompt_tokens else s.last  # a held-back tail carries no counts
                        admission.count_prompt(d.prompt_tokens)  # the generator admitted it: count the prompt
                        text = d.text if s.guard is None else s.guard.push(d.text)
                        if s.guard is not None and d.finish_reason is not None:
                            text += s.guard.flush()
                        s.waiting.extend(d.logprobs or ())
                        s.text.append(text)  # the model's text, captured as a whole answer is
                        shown = text if s.calls is None else s.calls.push(text)  # a possible tool call waits
                        if shown:
                            first = first or time.perf_counter()
                            s.sent += len(shown)
                            yield chunk([kind.delta(shown, None, index=d.index, logprobs=s.ready() if asked else None)])
                        flagged = s.guard is not None and s.guard.flag is not None
                        if flagged or d.finish_reason is not None:
                            s.reason = s.model_reason = "content_filter" if flagged else d.finish_reason
                            if flagged:
                                metrics.content_filter("answer", s.guard.flag.category)
                            if s.calls is not None:  # what was held: tool calls (finish_reason tool_calls) or content
                                held, s.reason = s.calls.close(s.reason)
                                for c in held:
                                    c.index = d.index
                                    yield chunk([c])
                            closing = chunk([kind.delta(None, s.reason, index=d.index)])
                            if all(x.reason is not None for x in streams):
                                for e in await finish(closing):
                                    yield e
                                return
                            yield closing
            finally:
                await admission.finish(*counts())  # no-op when finish() ran

        return event_stream(events(), admission.headers)


def event_stream(events: AsyncIterator[str], headers: dict[str, str]) -> StreamingResponse:
    """SSE from ``events``; an error after the status line is sent is reported in-band, then ``[DONE]``."""

    async def body() -> AsyncIterator[str]:
        try:
            async for e in events:
                yield e
        except Exception as exc:
            err = api_error_from(exc)
            yield sse(error_body(err.message, type=err.type, param=err.param, code=err.code))
        yield sse("[DONE]")

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

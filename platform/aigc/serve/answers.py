"""Answering one request in its endpoint's OpenAI shape, once the generator has it: a whole JSON answer, or
server-sent events as tokens arrive.

On the way out an answer is checked against the content policy (a streamed one piece by piece, holding back a
tail that could still become a flagged phrase: :class:`~aigc.serve.moderation.OutputGuard`), captured for
feedback before it leaves (so feedback can follow at once), counted in the usage metrics and against the key's
token limits (:class:`~aigc.serve.quota.Admission`). An error after the status line is sent is reported in-band,
as OpenAI does, and every stream ends with ``data: [DONE]``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from aigc.serve.api_errors import api_error_from
from aigc.serve.engine import Completion, Delta, Prompt, SamplingParams
from aigc.serve.feedback import FeedbackCapture
from aigc.serve.metrics import ingress_metrics
from aigc.serve.moderation import OutputGuard, Policy
from aigc.serve.quota import Admission
from aigc.serve.schemas import Usage, error_body
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
        text, reason = self.moderate(out.text, out.finish_reason)
        if self._feedback:  # stored before the answer leaves, so feedback can follow at once
            await self._feedback.capture(turn.rid, turn.model_name, turn.prompt, turn.params, text, reason, turn.key)
        choice = turn.kind.answer(text, reason) if turn.tools is None else answer_choice(text, reason, turn.tools)
        usage = Usage.of(out.prompt_tokens, out.completion_tokens)
        body = turn.kind.response(id=turn.rid, model=turn.model_name, choices=[choice], usage=usage).model_dump()
        return JSONResponse(body, headers=turn.admission.headers)

    def stream(self, turn: Turn, deltas: AsyncIterator[Delta]) -> StreamingResponse:
        """The streamed answer: events as ``deltas`` arrive; leaving early (a flagged answer, the client gone)
        closes ``deltas``, which stops the generation, and ends the key's request."""
        kind, admission, metrics = turn.kind, turn.admission, ingress_metrics()
        head = {"id": turn.rid, "created": int(time.time()), "model": turn.model_name}
        guard = OutputGuard(self._policy, self._holdback) if self._check else None
        answer: list[str] = []  # the text sent, for capture
        calls = ToolCallStream(turn.tools) if turn.tools else None  # holds what may be tool calls
        started, first = time.perf_counter(), None

        def chunk(choices: list[Any], usage: Usage | None = None) -> str:
            return sse(kind.chunk(**head, choices=choices, usage=usage).model_dump())

        async def finish(reason: FinishReason, d: Delta) -> list[str]:
            """The closing events; a finished stream is captured before they leave, as a whole answer is."""
            if self._feedback:  # the model's text, as a whole answer captures it
                await self._feedback.capture(turn.rid, turn.model_name, turn.prompt, turn.params, "".join(answer),
                                             reason, turn.key)  # fmt: skip
            tail = []
            if calls is not None:  # what was held: tool calls (finish_reason tool_calls) or content
                tail, reason = calls.close(reason)
            await admission.finish(d.prompt_tokens, d.completion_tokens)
            metrics.usage(turn.model_name, d.prompt_tokens, d.completion_tokens)
            if first is not None:
                metrics.timing(turn.model_name, first - started, time.perf_counter() - started, d.completion_tokens)
            if reason == "content_filter":
                metrics.content_filter("answer", guard.flag.category)
            out = [chunk([c]) for c in tail] + [chunk([kind.delta(None, reason)])]
            if turn.include_usage:  # OpenAI's last chunk: no choices, the usage
                out.append(chunk([], Usage.of(d.prompt_tokens, d.completion_tokens)))
            return out

        async def events() -> AsyncIterator[str]:
            nonlocal first
            last = Delta()
            if kind.opening is not None:
                yield chunk([kind.opening()])
            try:
                async with contextlib.aclosing(deltas):
                    async for d in deltas:
                        last = d if d.prompt_tokens else last  # a held-back tail carries no counts
                        admission.count_prompt(d.prompt_tokens)  # the generator admitted it: count the prompt
                        text = d.text if guard is None else guard.push(d.text)
                        if guard is not None and d.finish_reason is not None:
                            text += guard.flush()
                        answer.append(text)
                        text = text if calls is None else calls.push(text)
                        if text:
                            first = first or time.perf_counter()
                            yield chunk([kind.delta(text, None)])
                        if guard is not None and guard.flag is not None:
                            for e in await finish("content_filter", d):
                                yield e
                            return
                        if d.finish_reason is not None:
                            for e in await finish(d.finish_reason, d):
                                yield e
            finally:
                await admission.finish(last.prompt_tokens, last.completion_tokens)  # no-op when finish() ran

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

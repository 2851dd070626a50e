"""The ingress's calls to the ``Generator`` deployment: deadlines, one safe retry, and what a lost replica means.

A request may be retried only while its client has received nothing from it:

- a whole completion: its text comes back in one piece, so a replica that died (``RayActorError``) or refused it
  (:class:`~aigc.errors.ServiceUnavailableError`: unhealthy, shutting down, its batch failed) produced nothing
  the client saw; it is sent once more, and Serve routes it to another replica (it marks the dead one);
- a stream: only until its first delta arrives. After that a lost replica ends the stream promptly with an
  in-band error (the status line went out already), never a hang.

Every call carries the request's deadline (wall clock, ``time.time()``): the replica ends the request there
(:class:`~aigc.errors.RequestTimeoutError`), and until the first delta the ingress stops waiting shortly after
even if the replica never answers (one timer per request, not per token).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from aigc.errors import ServiceUnavailableError
from aigc.serve.engine import Completion, Delta, Prompt, SamplingParams
from aigc.serve.engine.requests import timeout_error

__all__ = ["GeneratorClient", "is_retryable"]

logger = logging.getLogger("ray.serve")

T = TypeVar("T")
_BACKSTOP_S = 2.0  # the ingress gives up this long after the deadline if the replica never answered


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed call produced nothing and may be sent again: the replica died or refused the work."""
    cause = getattr(exc, "cause", None) or exc
    return isinstance(exc, RayActorError) or isinstance(cause, (RayActorError, ServiceUnavailableError))


class GeneratorClient:
    """Calls to the generator deployment for one ingress replica.

    Args:
        handle: the ``Generator`` deployment handle.
        retries: times a call that produced nothing is sent again (1: one retry).
    """

    def __init__(self, handle: DeploymentHandle, retries: int = 1):
        self._handle, self._retries = handle, retries
        self.retried = 0  # calls sent again after a lost or refusing replica (for tests and logs)

    async def _with_retry(self, call: Callable[[], Awaitable[T]], model_id: str) -> T:
        for attempt in range(self._retries + 1):
            try:
                return await call()
            except Exception as exc:
                if attempt == self._retries or not is_retryable(exc):
                    raise
                self.retried += 1
                logger.warning("retrying a request for %r once: %s", model_id or "base", type(exc).__name__)
        raise AssertionError("unreachable")

    async def complete(self, model_id: str, prompt: Prompt, params: SamplingParams, deadline: float) -> Completion:
        """A whole completion, retried once if a replica was lost or refused it.

        Raises:
            RequestTimeoutError: past ``deadline`` (the replica's own error, or the ingress's backstop).
        """
        handle = self._handle.options(multiplexed_model_id=model_id)

        async def call() -> Completion:
            response = handle.complete.remote(prompt, params, deadline)
            try:
                return await asyncio.wait_for(response, _remaining(deadline) + _BACKSTOP_S)
            except TimeoutError:
                response.cancel()
                raise timeout_error() from None

        return await self._with_retry(call, model_id)

    async def open_stream(
        self, model_id: str, prompt: Prompt, params: SamplingParams, deadline: float
    ) -> AsyncIterator[Delta]:
        """Start a streamed generation and wait for its first delta (retried once before it), so that errors
        before any output (unknown adapter, prompt too long, overload, a lost replica) still become a status code.

        Raises:
            RequestTimeoutError: no first delta before ``deadline``.
        """
        handle = self._handle.options(multiplexed_model_id=model_id, stream=True)

        async def first() -> tuple[Any, Delta | None]:
            gen = handle.stream.remote(prompt, params, deadline)
            try:
                return gen, await asyncio.wait_for(gen.__anext__(), _remaining(deadline) + _BACKSTOP_S)
            except StopAsyncIteration:
                return gen, None
            except TimeoutError:
                gen.cancel()
                raise timeout_error() from None
            except BaseException:  # the client left, or the call failed: stop the replica's work either way
                gen.cancel()
                raise

        gen, head = await self._with_retry(first, model_id)

        async def deltas() -> AsyncIterator[Delta]:
            # After the first delta the replica's own deadline ends the stream (its timer runs on the replica's
            # event loop, apart from the engine thread); a dead replica raises here at once.
            try:
                if head is None:
                    return
                yield head
                async for d in gen:
                    yield d
            finally:
                gen.cancel()  # no-op when finished; stops the replica's generation if the client left

        return deltas()


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.time())

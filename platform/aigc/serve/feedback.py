"""The ingress side of the feedback loop: capture each answer under its completion id, accept ratings.

Both run the blocking store off the event loop (``asyncio.to_thread``). A failed capture is logged (the id
and the error, never the prompt or the answer) and the generation is answered anyway. See
:mod:`aigc.feedback.store` for the layout.

Provenance: a captured answer records the name of the API key that asked (``request.state.key_name``, set by
the auth middleware; None when the server runs without keys), and a rating the name of the key that sent it.
With ``serve.feedback_from: owner`` (the default) only the key that made a request may rate or correct its
answer. Each key may send ``serve.feedback_per_key_per_minute`` feedback posts per minute to one ingress
replica (a sliding window; every post counts, refused ones too, so ids cannot be probed for free); past it
the post gets OpenAI's 429 ``rate_limit_exceeded`` with ``Retry-After``. With
``serve.capture_retention_days``, each replica deletes expired captures and their feedback once an hour.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from aigc.errors import StorageError
from aigc.feedback.retention import retention_cutoff
from aigc.feedback.store import (
    FeedbackRequest,
    FeedbackStore,
    NotCompletionOwnerError,
    Rating,
    UnknownCompletionError,
)
from aigc.serve.api_errors import ApiError, RateLimitedError
from aigc.serve.engine import Prompt, SamplingParams

__all__ = ["FeedbackCapture", "FeedbackLimiter"]

logger = logging.getLogger("ray.serve")

SWEEP_EVERY_S = 3600.0  # retention: deleting needs a listing and one read per capture, so not more often
_WINDOW_S = 60.0


class FeedbackLimiter:
    """At most ``per_minute`` posts per key in any 60 seconds (a sliding window of post times per key).

    Args:
        per_minute: the limit (None = no limit).
        clock: monotonic seconds (a test passes its own).
    """

    def __init__(self, per_minute: int | None, clock: Callable[[], float] = time.monotonic):
        self.per_minute, self._clock = per_minute, clock
        self._posts: dict[str | None, collections.deque[float]] = {}

    def admit(self, key_name: str | None) -> None:
        """Count one post by ``key_name``.

        Raises:
            RateLimitedError: the key sent ``per_minute`` posts in the last minute (this one is not counted).
        """
        if self.per_minute is None:
            return
        now = self._clock()
        posts = self._posts.setdefault(key_name, collections.deque())
        while posts and posts[0] <= now - _WINDOW_S:
            posts.popleft()
        if len(posts) >= self.per_minute:
            wait = posts[0] + _WINDOW_S - now
            who = "this server (no API keys)" if key_name is None else f"API key '{key_name}'"
            raise RateLimitedError(
                f"Rate limit reached for feedback from {who}: {self.per_minute} per minute "
                f"(serve.feedback_per_key_per_minute). Please try again in {math.ceil(wait)}s.",
                wait,
            )
        posts.append(now)


class FeedbackCapture:
    """Capture and feedback for one ingress replica.

    Args:
        feedback_dir: the feedback store (local directory or ``s3://``/``gs://`` URI).
        owner_only: only the key that made a completion may rate it (``serve.feedback_from: owner``).
        per_key_per_minute: feedback posts per key per minute in this replica (None = no limit).
        retention_days: captures older than this are deleted by :meth:`keep_sweeping` (None = kept).
    """

    def __init__(
        self,
        feedback_dir: str,
        owner_only: bool = True,
        per_key_per_minute: int | None = None,
        retention_days: float | None = None,
    ):
        self.store = FeedbackStore(feedback_dir)
        self.owner_only = owner_only
        self.limiter = FeedbackLimiter(per_key_per_minute)
        self.retention_days = retention_days

    async def capture(
        self,
        completion_id: str,
        model: str,
        prompt: Prompt,
        params: SamplingParams,
        answer: str,
        finish_reason: str,
        key_name: str | None = None,
    ) -> bool:
        """Store one finished completion, with the name of the key that asked; False (and a log line) when the
        store refused it."""
        record: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion" if completion_id.startswith("chatcmpl-") else "text_completion",
            "created": int(time.time()),
            "model": model,
            "key_name": key_name,
            ("prompt" if isinstance(prompt, str) else "messages"): prompt if isinstance(prompt, str) else list(prompt),
            "params": {**dataclasses.asdict(params), "stop": list(params.stop)},
            "answer": answer,
            "finish_reason": finish_reason,
        }
        try:
            await asyncio.to_thread(self.store.capture, record)
        except Exception as exc:  # capture is best effort: the answer is already computed
            logger.warning("capture of %s failed (%s: %s); the answer was served", completion_id,
                           type(exc).__name__, exc)  # fmt: skip
            return False
        return True

    async def submit(self, req: FeedbackRequest, key_name: str | None) -> Rating:
        """Store ``key_name``'s rating (replacing its earlier one), or raise the API error that answers it:
        429 over the key's limit, 404 for an unknown id, 403 for another key's completion, 503 when the store
        is unavailable."""
        self.limiter.admit(key_name)
        try:
            return await asyncio.to_thread(self.store.add_feedback, req, key_name, self.owner_only)
        except UnknownCompletionError as exc:
            raise ApiError(404, exc.message, param="id", code="completion_not_found") from None
        except NotCompletionOwnerError as exc:
            raise ApiError(403, exc.message, param="id", code="not_completion_owner") from None
        except StorageError as exc:
            logger.error("feedback store unavailable: %s", exc)
            msg, code = "the feedback store is unavailable; retry later", "feedback_store_unavailable"
            raise ApiError(503, msg, type="server_error", code=code) from None

    async def sweep(self) -> None:
        """Delete the captures older than ``retention_days``, with their feedback (logged; failures too)."""
        try:
            removed = await asyncio.to_thread(self.store.delete_before, retention_cutoff(self.retention_days))
        except Exception as exc:  # the next sweep tries again; serving goes on
            logger.warning("feedback retention sweep failed (%s: %s)", type(exc).__name__, exc)
            return
        if removed.completions or removed.ratings:
            logger.info("feedback retention (%g days): removed %s", self.retention_days, removed)

    async def keep_sweeping(self, every_s: float = SWEEP_EVERY_S) -> None:
        """Sweep now and every ``every_s`` seconds, for the replica's life (returns at once without retention)."""
        if self.retention_days is None:
            return
        while True:
            await self.sweep()
            await asyncio.sleep(every_s)

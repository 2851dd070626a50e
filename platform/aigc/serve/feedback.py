"""The ingress side of the feedback loop: capture each answer under its completion id, accept ratings.

Both run the blocking store off the event loop (``asyncio.to_thread``). A failed capture is logged (the id
and the error, never the prompt or the answer) and the generation is answered anyway; a failed feedback
write is the caller's to map (the ingress answers 503). See :mod:`aigc.feedback.store` for the layout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from aigc.feedback.store import FeedbackRequest, FeedbackStore, Rating
from aigc.serve.engine import Prompt, SamplingParams

__all__ = ["FeedbackCapture"]

logger = logging.getLogger("ray.serve")


class FeedbackCapture:
    """Capture and feedback for one ingress replica.

    Args:
        feedback_dir: the feedback store (local directory or ``s3://``/``gs://`` URI).
    """

    def __init__(self, feedback_dir: str):
        self.store = FeedbackStore(feedback_dir)

    async def capture(
        self, completion_id: str, model: str, prompt: Prompt, params: SamplingParams, answer: str, finish_reason: str
    ) -> bool:
        """Store one finished completion; False (and a log line) when the store refused it."""
        record: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion" if completion_id.startswith("chatcmpl-") else "text_completion",
            "created": int(time.time()),
            "model": model,
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

    async def submit(self, req: FeedbackRequest) -> Rating:
        """Append one rating (raises the store's UnknownCompletionError / StorageError)."""
        return await asyncio.to_thread(self.store.add_feedback, req)

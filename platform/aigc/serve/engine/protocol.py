"""What the ``Generator`` deployment needs from an engine: :class:`ServingEngine`.

The deployment (:mod:`aigc.serve.generator`) and its gauges (:func:`aigc.serve.metrics.start_generator_gauges`)
use an engine only through these members, so another engine (vLLM's ``AsyncLLMEngine`` behind a thin adapter,
on GPUs) can replace :class:`~aigc.serve.engine.GenerationEngine` without touching the deployment, as
``ray.serve.llm`` keeps its server apart from the engine it drives. ``tests/test_engine.py`` checks that our
engine satisfies it, member by member and signature by signature.

Contract beyond the signatures:

* ``agenerate``/``astream`` end a request at ``timeout_s`` with :class:`~aigc.errors.RequestTimeoutError`;
  closing ``astream``'s iterator early frees the request's place in the batch; the last delta carries the
  ``finish_reason`` and the token counts. With ``params.n`` > 1, ``astream`` yields every choice's deltas
  (each with its ``index``; each choice's last one carries its ``finish_reason``) and ``agenerate`` returns
  all of them in ``Completion.choices``; ``params.logprobs`` asks for each token's log-probability
  (``Delta.logprobs``/``Completion.logprobs``); ``params.response_format`` asks for JSON enforced while decoding
  (an engine that cannot enforce one raises :class:`~aigc.errors.InvalidRequestError` naming
  ``response_format``).
* ``adapter`` is a name given to ``load_adapter`` (None = the base model); a request holds its adapter with
  ``acquire_adapter`` (False: not loaded, or being deleted) and ``release_adapter``; ``delete_adapter`` is
  idempotent and waits for the last holder.
* ``check_health`` raises when the engine cannot serve (Serve's health check: the replica is replaced).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from aigc.serve.engine.types import Completion, Delta, Prompt, SamplingParams

__all__ = ["ServingEngine"]


@runtime_checkable
class ServingEngine(Protocol):
    """A generation engine for one base model and named LoRA adapters, as the ``Generator`` deployment drives it."""

    max_batch_size: int
    """Requests decoded together at most (published as a gauge)."""

    @property
    def model_id(self) -> str:
        """The id of the base model (hub id or directory name): only adapters trained on it are loaded."""
        ...

    @property
    def adapters(self) -> list[str]:
        """Names of the adapters loaded and usable now."""
        ...

    @property
    def active_rows(self) -> int:
        """Requests being decoded now."""
        ...

    @property
    def waiting_requests(self) -> int:
        """Requests waiting for a place in the batch."""
        ...

    def check_health(self) -> None:
        """Raise when the engine cannot serve."""
        ...

    def load_adapter(self, path: str, adapter_name: str) -> None:
        """Load the PEFT adapter directory ``path`` as ``adapter_name`` (blocking; called from a thread)."""
        ...

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter once no request holds it; idempotent."""
        ...

    def acquire_adapter(self, adapter_name: str) -> bool:
        """Hold the adapter for one request; False when it is not loaded or is being deleted."""
        ...

    def release_adapter(self, adapter_name: str) -> None:
        """End one request's hold on the adapter; never blocks."""
        ...

    async def agenerate(
        self, prompt: Prompt, params: SamplingParams, adapter: str | None = None, timeout_s: float | None = None
    ) -> Completion:
        """A whole reply."""
        ...

    def astream(
        self, prompt: Prompt, params: SamplingParams, adapter: str | None = None, timeout_s: float | None = None
    ) -> AsyncIterator[Delta]:
        """Text deltas as they are decoded (an async generator)."""
        ...

    def close(self) -> None:
        """Stop the engine; requests still waiting or running fail."""
        ...

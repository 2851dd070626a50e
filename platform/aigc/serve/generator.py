"""The ``Generator`` deployment: a replica holding the engine, the base model and LoRA adapters from the registry.

Adapters are loaded per replica on first use through ``@serve.multiplexed`` (LRU,
``serve.max_adapters_per_replica``), so a newly registered version is served without a redeploy, and Serve
routes a request for an adapter to a replica that already holds it. Errors raised here are platform errors
(:mod:`aigc.errors`); the ingress alone turns them into HTTP statuses.

Under faults:

- ``check_health`` asks the engine (:class:`~aigc.serve.engine.ServingEngine`'s ``check_health``): a dead or
  stalled engine thread, failing forward passes or an untrustworthy model make Serve replace the replica.
- An adapter that fails to load is remembered as failed for ``adapter_retry_s``: requests for it fail at once
  instead of re-reading it (no retry storm, no repeated pauses of the batch). Only adapters trained on this
  replica's base model are loaded (:func:`aigc.serve.resolver.check_servable`).
- The registry unreachable (an object-store outage): adapters already loaded keep serving (Serve's multiplexed
  cache never asks the registry again); a new one answers :class:`~aigc.errors.ServiceUnavailableError`.
- Each call carries the request's deadline; the engine ends the request there and frees its row.

Runtime adapters (``POST /v1/adapters``, :mod:`aigc.registry.runtime`) load the same way; a replica unloads one
within seconds of its ``DELETE`` (:mod:`aigc.serve.runtime_adapters`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator

from ray import serve

from aigc.errors import (
    AdapterLoadError,
    InvalidRequestError,
    ModelNotFoundError,
    RegistryError,
    ServiceUnavailableError,
)
from aigc.registry import Registry
from aigc.registry.runtime import ServedModels
from aigc.serve.engine import Completion, Delta, GenerationEngine, Prompt, SamplingParams, ServingEngine
from aigc.serve.engine.tool_prompts import ToolSyntax, tool_syntax
from aigc.serve.metrics import start_generator_gauges
from aigc.serve.resolver import check_servable
from aigc.serve.runtime_adapters import RuntimeTracker

__all__ = ["Generator", "LoadedAdapter"]

logger = logging.getLogger("ray.serve")


class LoadedAdapter:
    """What the multiplexed loader returns: one registry version loaded into the engine as ``name``.

    Serve calls ``__del__`` (in a thread) when it evicts the adapter from the replica's LRU cache; the
    garbage collector may call it again later, so unloading is idempotent.
    """

    def __init__(self, engine: ServingEngine, name: str, model_id: str, loaded_at: float | None = None):
        self.engine, self.name, self.model_id = engine, name, model_id
        self.loaded_at = loaded_at  # a runtime adapter's record stamp (aigc.serve.runtime_adapters)
        self.stale = False  # unloaded because its runtime record went away: the next use loads it again
        self._unloaded = False

    def adopt(self, fresh: LoadedAdapter) -> None:
        """Take over ``fresh``'s engine adapter (a stale entry in Serve's cache, loaded again)."""
        self.name, self.loaded_at, self.stale, self._unloaded = fresh.name, fresh.loaded_at, False, False
        fresh._unloaded = True  # its engine adapter is ours now: dropping ``fresh`` must not unload it

    def unload(self) -> None:
        if self._unloaded:
            return
        self._unloaded = True
        try:
            self.engine.delete_adapter(self.name)
        except Exception:  # never fail Serve's eviction (it would fail the load that triggered it)
            logger.exception("failed to unload adapter %s (%s)", self.name, self.model_id)

    def __del__(self) -> None:
        self.unload()


@serve.deployment(name="Generator")
class Generator:
    """A replica holding the base model and up to ``max_adapters`` LoRA adapters (LRU).

    Requests for the base model carry no multiplexed model id; any other id is a registry ``name:vN``.

    Args:
        model_name_or_path: hub id or local directory of the base model.
        registry_dir: the adapter registry (local directory or ``s3://`` / ``gs://`` URI).
        base_model_id: the id clients use for the base model.
        dtype: weights dtype (``auto`` = float32 on CPU, bf16/fp16 on GPU).
        trust_remote_code: allow custom modelling code from the hub.
        max_adapters: adapters kept loaded per replica; the least recently used is evicted beyond this.
        max_batch_size: requests the engine decodes together (continuous batching).
        max_replicas: the deployment's autoscaling ceiling (published as a metric for alerting).
        max_prompt_tokens: the longest prompt accepted, in tokens (None = the model's context).
        stall_timeout_s: with work waiting, no forward pass for this long fails the health check.
        adapter_retry_s: how long an adapter that failed to load is answered from memory before a new try.
    """

    def __init__(
        self,
        model_name_or_path: str,
        registry_dir: str,
        base_model_id: str,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        max_adapters: int = 4,
        max_batch_size: int = 32,
        max_replicas: int = 1,
        max_prompt_tokens: int | None = None,
        stall_timeout_s: float = 30.0,
        adapter_retry_s: float = 30.0,
        quantization: str = "none",
    ):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray hides GPUs from a num_gpus=0 replica
        # Used only through the ServingEngine protocol (aigc.serve.engine.protocol): another engine can replace it.
        self._engine: ServingEngine = GenerationEngine(
            model_name_or_path,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
            max_batch_size=max_batch_size,
            max_prompt_tokens=max_prompt_tokens,
            stall_timeout_s=stall_timeout_s,
            quantization=quantization,
        )
        self._registry = ServedModels(Registry(registry_dir))
        self._runtime = RuntimeTracker(self._registry.runtime)
        with contextlib.suppress(RuntimeError):  # Serve runs the constructor on the replica's event loop
            self._sweep_task = asyncio.get_running_loop().create_task(self._runtime.keep_sweeping())
        self._adapter_retry_s = adapter_retry_s
        self._failed: dict[str, tuple[float, Exception]] = {}  # model id -> (retry after, the error it got)
        self._base_model_id = base_model_id
        self._stop_gauges = start_generator_gauges(self._engine, max_replicas)
        self._load_counter = itertools.count()
        self._tool_syntax: ToolSyntax | None = None

        # max_adapters comes from config, so the multiplexed loader is wrapped here rather than with a
        # decorator on the class (as ray.serve.llm's LLMServer does). Serve keeps the LRU cache on it.
        async def get_adapter(model_id: str) -> LoadedAdapter:
            return await self._load_adapter(model_id)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(get_adapter)

    async def check_health(self) -> None:
        """Serve's liveness probe: raises when the engine cannot serve (the replica is then replaced)."""
        self._engine.check_health()

    async def _load_adapter(self, model_id: str) -> LoadedAdapter:
        try:
            entry = await asyncio.to_thread(self._registry.resolve, model_id)
        except RegistryError as exc:
            # The ingress resolved this id a moment ago, so it was removed since; the registry's message
            # names its location, which stays in the server log.
            logger.warning("adapter %s is no longer in the registry: %s", model_id, exc)
            raise ModelNotFoundError(
                f"The model '{model_id}' does not exist", param="model", code="model_not_found"
            ) from None
        except OSError as exc:
            raise _registry_unavailable(model_id, exc) from None
        check_servable(entry, self._engine.model_id)
        try:
            path = await asyncio.to_thread(self._registry.local_adapter_dir, entry)
        except OSError as exc:
            raise _registry_unavailable(model_id, exc) from None
        # peft adapter names must be unique and free of '.', ':'; a reload after eviction gets a new name.
        name = f"{re.sub(r'[^A-Za-z0-9]', '_', entry.name)}_v{entry.version}_{next(self._load_counter)}"
        await asyncio.to_thread(self._engine.load_adapter, path, name)
        logger.info("loaded adapter %s as %s", entry.model_id, name)
        adapter = LoadedAdapter(self._engine, name, entry.model_id, entry.created_at if entry.runtime else None)
        if entry.runtime:
            self._runtime.track(adapter)
        return adapter

    async def _get_adapter(self, model_id: str) -> LoadedAdapter:
        """The loaded adapter, or the error its last load got if that was less than ``adapter_retry_s`` ago."""
        failed = self._failed.get(model_id)
        if failed is not None and time.monotonic() < failed[0]:
            raise failed[1]
        try:
            adapter = await self.get_adapter(model_id)
            if adapter.stale:  # a runtime adapter deleted or replaced since: what its record says now, or 404
                adapter.adopt(await self._load_adapter(model_id))
                self._runtime.track(adapter)
            return adapter
        except (AdapterLoadError, InvalidRequestError) as exc:  # the files or the entry: retrying cannot help soon
            self._failed[model_id] = (time.monotonic() + self._adapter_retry_s, exc)
            raise

    @contextlib.asynccontextmanager
    async def _adapter_for_request(self) -> AsyncIterator[str | None]:
        """The engine adapter name this request uses (None = base), held loaded until the request ends."""
        model_id = serve.get_multiplexed_model_id()
        if not model_id or model_id == self._base_model_id:
            yield None
            return
        # An adapter evicted between the cache lookup and acquire() is loaded again (new engine name).
        for _ in range(3):
            adapter = await self._get_adapter(model_id)
            if self._engine.acquire_adapter(adapter.name):
                break
        else:
            raise AdapterLoadError(f"adapter {model_id} kept being evicted while loading; retry the request")
        try:
            yield adapter.name
        finally:
            self._engine.release_adapter(adapter.name)

    async def complete(self, prompt: Prompt, params: SamplingParams, deadline: float | None = None) -> Completion:
        """A whole completion for the request's model (its multiplexed model id), ended at ``deadline``.

        Args:
            deadline: wall-clock time (``time.time()``) at which the request ends with a timeout error.
        """
        async with self._adapter_for_request() as adapter:
            return await self._engine.agenerate(prompt, params, adapter=adapter, timeout_s=_timeout(deadline))

    async def stream(
        self, prompt: Prompt, params: SamplingParams, deadline: float | None = None
    ) -> AsyncIterator[Delta]:
        """Text deltas for the request's model; call with ``handle.options(stream=True)``."""
        # aclosing: a cancelled request (client gone) closes the engine stream at once, which stops the model.
        async with (
            self._adapter_for_request() as adapter,
            contextlib.aclosing(
                self._engine.astream(prompt, params, adapter=adapter, timeout_s=_timeout(deadline))
            ) as deltas,
        ):
            async for delta in deltas:
                yield delta

    def tool_syntax(self) -> ToolSyntax:
        """What the base model's chat template does with tools (the ingress plans tool calls with it)."""
        if self._tool_syntax is None:
            self._tool_syntax = tool_syntax(getattr(self._engine, "tokenizer", None))
        return self._tool_syntax

    def active_rows(self) -> int:
        """Requests decoding in this replica's running batch now (for tests and debugging)."""
        return self._engine.active_rows

    async def warm_adapter(self) -> str:
        """Load the request's adapter (its multiplexed model id) now; returns its engine name. ``POST
        /v1/adapters`` calls it so that an adapter that cannot load is refused there, not at first use."""
        async with self._adapter_for_request() as adapter:
            return adapter or ""

    async def sweep_runtime_adapters(self) -> list[str]:
        """Unload deleted or replaced runtime adapters now (the replica also does it every few seconds)."""
        return await self._runtime.sweep()

    def loaded_adapters(self) -> list[str]:
        """Engine names of the adapters loaded in this replica (for tests and debugging)."""
        return self._engine.adapters


def _timeout(deadline: float | None) -> float | None:
    """Seconds left until a wall-clock deadline (the ingress set it; nodes share a clock closely enough)."""
    return None if deadline is None else deadline - time.time()


def _registry_unavailable(model_id: str, exc: BaseException) -> ServiceUnavailableError:
    logger.warning("registry unreadable while loading %s: %s", model_id, exc)
    return ServiceUnavailableError(
        f"the model '{model_id}' cannot be loaded right now: the model registry is unreachable; retry shortly",
        code="registry_unavailable",
    )

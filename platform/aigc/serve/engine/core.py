"""The generation engine: one base model, many LoRA adapters, continuous batching (no Ray, no Serve).

Requests join a running batch between decoding steps and leave as soon as they finish; rows on different
adapters and the base model share each forward pass (:mod:`aigc.serve.engine.batch`). One engine thread
owns the model: it admits waiting requests, runs a step, samples one token per row with the row's own
settings and RNG, detokenizes incrementally, cuts stop strings and hands each text piece to its request at
once (an ``asyncio.Queue`` on the caller's loop, or a plain queue for blocking callers).

Costs to know: a step's time grows with the rows in it, so ``max_batch_size`` trades per-request latency
for throughput; prefilling new rows pauses the running ones for one forward pass, and a prefill has a fixed
cost (on a small model about two thirds of a decoding step) whatever its rows. So while a batch is running,
waiting requests are admitted together: as soon as ``admit_min_rows`` of them wait (or they would fill the
batch), or the oldest has waited ``admit_max_wait_s``. An idle engine admits a request at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from aigc.data.templates import render_prompt
from aigc.errors import AdapterLoadError, InvalidRequestError
from aigc.models.loading import load_base_model, load_tokenizer, model_id_for
from aigc.serve.engine.adapters import BASE_ADAPTER, PLACEHOLDER, AdapterSet
from aigc.serve.engine.batch import Row, RunningBatch, sample_all
from aigc.serve.engine.prompts import PromptEncoder
from aigc.serve.engine.text import IncrementalDetokenizer, StopFilter
from aigc.serve.engine.types import Completion, Delta, FinishReason, Prompt, SamplingParams, join_deltas

__all__ = ["Completion", "Delta", "GenerationEngine", "Prompt", "SamplingParams"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str
    sink: Callable[[Delta | BaseException], None] = lambda item: None
    cancel: threading.Event = field(default_factory=threading.Event)
    detok: Any = None
    stops: Any = None
    done: bool = False
    arrived: float = field(default_factory=time.monotonic)


class GenerationEngine:
    """A base causal LM plus named LoRA adapters, generating for many requests in one running batch.

    Args:
        model_name_or_path: hub id or local directory of the base model.
        dtype: ``auto`` (float32 on CPU, bf16/fp16 on GPU), ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu`` or ``cuda[:N]``.
        trust_remote_code: allow custom modelling code from the hub.
        max_batch_size: rows decoded together; further requests wait in arrival order.
        admit_min_rows: while a batch runs, prefill waiting requests once this many wait (default: an
            eighth of ``max_batch_size``, at least 1).
        admit_max_wait_s: ...or once the oldest has waited this long (bounds the added time to first token).
        max_prompt_tokens: the longest prompt accepted, in tokens (None = the model's context only).
    """

    def __init__(
        self,
        model_name_or_path: str,
        dtype: str = "auto",
        device: str = "cpu",
        trust_remote_code: bool = False,
        max_batch_size: int = 32,
        admit_min_rows: int | None = None,
        admit_max_wait_s: float = 0.02,
        max_prompt_tokens: int | None = None,
    ):
        from peft import LoraConfig, get_peft_model

        self.model_name_or_path = model_name_or_path
        self.max_batch_size = max_batch_size
        self.admit_min_rows = admit_min_rows or max(1, max_batch_size // 8)
        self.admit_max_wait_s = admit_max_wait_s
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code)
        self._prompts = PromptEncoder(self.tokenizer)  # client text never becomes control tokens
        base = load_base_model(model_name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        self.max_context: int | None = getattr(base.config, "max_position_embeddings", None)
        self._eos_ids = set(self._eos_token_ids(base))
        # A rank-1 zero LoRA keeps the PeftModel valid with no adapter loaded: one code path for all rows.
        first_linear = next(n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
        placeholder = LoraConfig(r=1, target_modules=[first_linear], lora_dropout=0.0)
        self._model = get_peft_model(base, placeholder, adapter_name=PLACEHOLDER).eval()

        self._model_lock = threading.Lock()  # one step, load or delete at a time
        self._wake = threading.Condition()
        self._adapters = AdapterSet(self._model, self._model_lock, wake=self._notify)
        self._batch = RunningBatch(self._model, pad_id=int(self.tokenizer.pad_token_id or 0))
        self._waiting: deque[_Request] = deque()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="aigc-engine", daemon=True)
        self._thread.start()

    # properties ------------------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        """The id clients use for the base model: the hub id or the local directory's name."""
        return model_id_for(self.model_name_or_path)

    @property
    def model(self) -> Any:
        """The peft ``PeftModel`` wrapping the base model (for inspection; generate through the engine)."""
        return self._model

    @property
    def device(self) -> torch.device:
        return self._model.device

    @property
    def adapters(self) -> list[str]:
        """Names of the adapters loaded and usable now."""
        return self._adapters.names

    @property
    def active_rows(self) -> int:
        """Requests decoding in the running batch now."""
        return len(self._batch)

    @property
    def waiting_requests(self) -> int:
        """Requests waiting for a batch slot."""
        return len(self._waiting)

    @property
    def max_rows_seen(self) -> int:
        """The most rows that ever shared one decoding step."""
        return self._batch.max_rows_seen

    # 1. adapters ----------------------------------------------------------------------------------------
    def load_adapter(self, path: str, adapter_name: str) -> None:
        """Load the PEFT adapter directory ``path`` as ``adapter_name``; waits for the current step to end.

        Raises:
            AdapterLoadError: the directory is not a LoRA adapter this engine can serve, or peft failed.
        """
        self._adapters.load(path, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; idempotent. A busy adapter is removed when its last request releases it."""
        self._adapters.delete(adapter_name)

    def acquire_adapter(self, adapter_name: str) -> bool:
        """Mark the adapter in use by one request; False when it is not loaded or is being deleted."""
        return self._adapters.acquire(adapter_name)

    def release_adapter(self, adapter_name: str) -> None:
        """End one request's use of the adapter (never blocks; a pending delete runs between steps)."""
        self._adapters.release(adapter_name)

    # 2. prompts -----------------------------------------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        """Raw text as is; a conversation through the tokenizer's chat template (the one training used)."""
        return prompt if isinstance(prompt, str) else render_prompt(self.tokenizer, prompt)

    def _prepare(self, prompt: Prompt, params: SamplingParams, adapter: str | None) -> _Request:
        """Render and tokenize (the caller runs this off its event loop); too-long prompts fail here."""
        # A chat template writes its own special tokens (bos...); raw prompts get the tokenizer's usual ones.
        param = "prompt" if isinstance(prompt, str) else "messages"
        ids = self._prompts.encode(prompt if isinstance(prompt, str) else list(prompt))
        if not ids:
            raise InvalidRequestError("the prompt is empty", param=param)
        if params.seed is not None and not 0 <= params.seed < 2**63:  # on the engine thread it would fail the batch
            raise InvalidRequestError(f"seed must be >= 0 and < 2**63, got {params.seed}", param="seed")
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; this server accepts at most {self.max_prompt_tokens}",
                param=param,
                code="prompt_too_long",
            )
        if self.max_context is not None and len(ids) + params.max_tokens > self.max_context:
            raise InvalidRequestError(
                f"this model's context is {self.max_context} tokens; the prompt has {len(ids)} and max_tokens asks "
                f"for {params.max_tokens} more. Shorten the prompt or lower max_tokens.",
                param=param,
                code="context_length_exceeded",
            )
        return _Request(prompt_ids=list(ids), params=params, adapter=adapter or BASE_ADAPTER)

    # 3. the public calls --------------------------------------------------------------------------------
    def generate(self, prompt: Prompt, params: SamplingParams, adapter: str | None = None) -> Completion:
        """A whole reply (blocking; safe from many threads at once: their requests share the batch)."""
        req = self._prepare(prompt, params, adapter)
        items: queue.Queue = queue.Queue()
        req.sink = items.put
        self._submit(req)
        parts: list[str] = []
        while True:
            item = items.get()
            if isinstance(item, BaseException):
                raise item
            parts.append(item.text)
            if item.finish_reason is not None:
                return Completion("".join(parts), item.finish_reason, item.prompt_tokens, item.completion_tokens)

    async def agenerate(self, prompt: Prompt, params: SamplingParams, adapter: str | None = None) -> Completion:
        """:meth:`generate` for asyncio callers; cancelling the caller frees the request's batch slot."""
        parts: list[str] = []
        async for d in self.astream(prompt, params, adapter):
            parts.append(d.text)
            if d.finish_reason is not None:
                return Completion("".join(parts), d.finish_reason, d.prompt_tokens, d.completion_tokens)
        raise RuntimeError("the engine ended a request without a final delta")

    async def astream(self, prompt: Prompt, params: SamplingParams, adapter: str | None = None) -> AsyncIterator[Delta]:
        """Text deltas as they are decoded; the last carries finish_reason and token counts.

        Closing the iterator early (a client that went away) frees the request's slot at the next step.
        """
        req = await asyncio.to_thread(self._prepare, prompt, params, adapter)
        loop, items = asyncio.get_running_loop(), asyncio.Queue()

        def sink(item: Delta | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                req.cancel.set()

        req.sink = sink
        self._submit(req)
        try:
            while True:
                item = await items.get()
                # A consumer slower than the engine gets what has piled up as one delta (fewer messages
                # downstream under load; one token at a time when it keeps up).
                while isinstance(item, Delta) and item.finish_reason is None and not items.empty():
                    item = join_deltas(item, items.get_nowait())
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            req.cancel.set()  # no-op when finished; frees the slot when the consumer left early

    def close(self) -> None:
        """Stop the engine thread; requests still waiting or running fail."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout=30)

    # 4. the engine thread -------------------------------------------------------------------------------
    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def _submit(self, req: _Request) -> None:
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._waiting.append(req)
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._closed or self._waiting or len(self._batch) or self._adapters.pending):
                    self._wake.wait()
                if self._closed:
                    break
                new = self._admissible()
            new = [r for r in new if not r.cancel.is_set()]
            try:
                with self._model_lock:
                    self._adapters.purge_locked()
                    if new:
                        self._admit(new)
                    if len(self._batch):
                        self._step()
            except Exception as exc:  # fail the requests in flight, never the engine
                logger.exception("generation step failed")
                for r in [*(row.state for row in self._batch.rows), *new]:
                    if not r.done:
                        r.done = True
                        r.sink(exc)
                self._batch = RunningBatch(self._model, self._batch.pad_id)
        err = RuntimeError("the engine was closed")
        for r in [*self._waiting, *(row.state for row in self._batch.rows)]:
            r.sink(err)

    def _admissible(self) -> list[_Request]:
        """The waiting requests to prefill now (the caller holds ``_wake``); see the module doc."""
        room = min(self.max_batch_size - len(self._batch), len(self._waiting))
        if room <= 0:
            return []
        if (
            len(self._batch)
            and room < self.admit_min_rows
            and time.monotonic() - self._waiting[0].arrived < self.admit_max_wait_s
        ):
            return []
        return [self._waiting.popleft() for _ in range(room)]

    def _admit(self, reqs: list[_Request]) -> None:
        rows = []
        for r in reqs:
            if not self._adapters.is_loaded(r.adapter):
                r.done = True
                r.sink(AdapterLoadError(f"adapter {r.adapter!r} is not loaded"))
                continue
            p = r.params
            gen = None
            if p.temperature > 0:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(p.seed if p.seed is not None else int.from_bytes(os.urandom(7), "big"))
            r.detok, r.stops = IncrementalDetokenizer(self.tokenizer), StopFilter(p.stop)
            rows.append(Row(r.prompt_ids, r.adapter, p.temperature, p.top_p, p.top_k, gen, state=r))
        if not rows:
            return
        tokens = sample_all(self._batch.add(rows), rows)
        keep = [True] * (len(self._batch) - len(rows)) + [
            self._emit(row, t) for row, t in zip(rows, tokens, strict=True)
        ]
        self._batch.keep(keep)

    def _step(self) -> None:
        alive = [not row.state.cancel.is_set() for row in self._batch.rows]
        self._batch.keep(alive)  # clients that left free their slot before the forward pass
        if not len(self._batch):
            return
        rows = self._batch.rows
        tokens = sample_all(self._batch.decode(), rows)
        self._batch.keep([self._emit(row, t) for row, t in zip(rows, tokens, strict=True)])

    def _emit(self, row: Row, token: int) -> bool:
        """Record one token for ``row``, send what text it completes; False when the row is finished."""
        r: _Request = row.state
        row.tokens.append(token)
        n, p = len(row.tokens), r.params
        reason: FinishReason | None = None
        if token in self._eos_ids:
            reason = "stop"
        else:
            out = r.stops.push(r.detok.push(token))
            if out:  # counts so far travel with every delta (usage for a stream cut short downstream)
                r.sink(Delta(text=out, prompt_tokens=len(r.prompt_ids), completion_tokens=n))
            if r.stops.hit:
                reason = "stop"
            elif n >= p.max_tokens:
                reason = "length"
        if reason is None and not r.cancel.is_set():
            return True
        tail = r.stops.flush()
        if tail:
            r.sink(Delta(text=tail))
        r.done = True
        r.sink(Delta(finish_reason=reason or "stop", prompt_tokens=len(r.prompt_ids), completion_tokens=n))
        return False

    def _eos_token_ids(self, model: Any) -> list[int]:
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        cfg_eos = getattr(model.generation_config, "eos_token_id", None)
        if cfg_eos is not None:
            ids.update([cfg_eos] if isinstance(cfg_eos, int) else cfg_eos)
        if not ids:
            raise ValueError(f"{self.model_name_or_path}: tokenizer and generation config name no eos token")
        return sorted(ids)

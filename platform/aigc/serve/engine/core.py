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

Faults stay where they start:

1. **A row's own failure ends that row alone** (sampling, non-finite scores, detokenizing, stop strings):
   the others decode on (:mod:`aigc.serve.engine.sampling`).
2. **A failed prefill fails only the rows being admitted**: the running batch is untouched, and when several
   rows were admitted together each is retried alone, so only the one at fault fails.
3. **A failed decoding step** (one forward pass shared by every row) ends the running rows with a retryable
   error; failing passes in a row, no pass for too long while work waits, or an untrustworthy model make the
   engine unhealthy (:mod:`aigc.serve.engine.health`), new requests are refused, and Serve replaces the replica.
4. **Every request can have a deadline**: past it, the engine ends the request with
   :class:`~aigc.errors.RequestTimeoutError` and frees its row; the caller's side stops waiting at the same
   time even if the engine thread is stuck.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from aigc.data.templates import render_prompt
from aigc.models.loading import load_base_model, load_tokenizer, model_id_for
from aigc.serve.engine.adapters import PLACEHOLDER, AdapterSet
from aigc.serve.engine.grammar import Grammars
from aigc.serve.engine.lora_batch import LoraForward
from aigc.serve.engine.prompts import PromptEncoder
from aigc.serve.engine.requests import Request, prepare, timeout_error
from aigc.serve.engine.scheduler import Scheduler
from aigc.serve.engine.types import Collector, Completion, Delta, Prompt, SamplingParams, join_deltas

__all__ = ["Completion", "Delta", "GenerationEngine", "Prompt", "SamplingParams"]

_TIMED_OUT = object()  # the caller-side deadline timer's marker in a request's queue
_CALLER_GRACE_S = 0.5  # the caller stops waiting this long after the deadline (the engine usually ends it first)


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
        stall_timeout_s: with work waiting, no forward pass for this long makes the engine unhealthy.
        quantization: ``none``, ``int8`` (torchao on CPU, bitsandbytes on CUDA) or ``nf4`` (CUDA only): the base
            model's weights; adapters stay in full precision (:mod:`aigc.models.quantize`).
        batched_lora: rows on different adapters share one product per LoRA layer
            (:mod:`aigc.serve.engine.lora_batch`); False splits each layer's rows per adapter (peft's
            mixed-adapter forward, the slower path kept for comparison).
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
        stall_timeout_s: float = 30.0,
        quantization: str = "none",
        batched_lora: bool = True,
    ):
        from peft import LoraConfig, get_peft_model

        self.model_name_or_path = model_name_or_path
        self.max_batch_size = max_batch_size
        self.admit_min_rows = admit_min_rows or max(1, max_batch_size // 8)
        self.admit_max_wait_s = admit_max_wait_s
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code)
        self._prompts = PromptEncoder(self.tokenizer)  # client text never becomes control tokens
        base = load_base_model(model_name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                               quantization=quantization)  # fmt: skip
        self.max_context: int | None = getattr(base.config, "max_position_embeddings", None)
        self._eos_ids = set(self._eos_token_ids(base))
        head = base.get_output_embeddings()  # its out_features: the logits' width (a 4-bit weight is packed)
        vocab = getattr(head, "out_features", None) or base.config.vocab_size
        self.grammars = Grammars(self.tokenizer, vocab, self._eos_ids)  # xgrammar loads on the first format
        # A rank-1 zero LoRA keeps the PeftModel valid with no adapter loaded: one code path for all rows.
        first_linear = next(n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
        placeholder = LoraConfig(r=1, target_modules=[first_linear], lora_dropout=0.0)
        self._model = get_peft_model(base, placeholder, adapter_name=PLACEHOLDER).eval()

        self._model_lock = threading.Lock()  # one step, load or delete at a time
        lora = LoraForward(self._model, batched=batched_lora)
        self._adapters = AdapterSet(self._model, self._model_lock, wake=lambda: self._scheduler.notify(),
                                    on_change=lora.reset)  # fmt: skip
        self._scheduler = Scheduler(
            self._model, self._model_lock, self._adapters, self.tokenizer, self._eos_ids,
            max_batch_size=max_batch_size, admit_min_rows=self.admit_min_rows,
            admit_max_wait_s=admit_max_wait_s, stall_timeout_s=stall_timeout_s, lora=lora,
        )  # fmt: skip

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
        return len(self._scheduler.batch)

    @property
    def waiting_requests(self) -> int:
        """Requests waiting for a batch slot."""
        return len(self._scheduler.waiting)

    @property
    def max_rows_seen(self) -> int:
        """The most rows that ever shared one decoding step."""
        return self._scheduler.batch.max_rows_seen

    # 1. health ------------------------------------------------------------------------------------------
    def health(self) -> str | None:
        """Why the engine cannot serve (a dead or stalled thread, failing passes, a broken model), or None."""
        return self._scheduler.health()

    def check_health(self) -> None:
        """Raise when the engine cannot serve (Serve's ``check_health`` contract).

        Raises:
            RuntimeError: the reason from :meth:`health`.
        """
        problem = self.health()
        if problem is not None:
            raise RuntimeError(f"generation engine unhealthy: {problem}")

    # 2. adapters ----------------------------------------------------------------------------------------
    def load_adapter(self, path: str, adapter_name: str) -> None:
        """Load the PEFT adapter directory ``path`` as ``adapter_name``; reads files before taking the model.

        Raises:
            AdapterLoadError: the directory is not a LoRA adapter this engine can serve, or peft failed (the
                model is left exactly as it was).
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

    # 3. prompts -----------------------------------------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        """Raw text as is; a conversation through the tokenizer's chat template (the one training used)."""
        return prompt if isinstance(prompt, str) else render_prompt(self.tokenizer, prompt)

    def _prepare(
        self, prompt: Prompt, params: SamplingParams, adapter: str | None, timeout_s: float | None = None
    ) -> Request:
        return prepare(self._prompts, prompt, params, adapter, max_prompt_tokens=self.max_prompt_tokens,
                       max_context=self.max_context, timeout_s=timeout_s, grammars=self.grammars)  # fmt: skip

    # 4. the public calls --------------------------------------------------------------------------------
    def generate(
        self, prompt: Prompt, params: SamplingParams, adapter: str | None = None, timeout_s: float | None = None
    ) -> Completion:
        """A whole reply (blocking; safe from many threads at once: their requests share the batch).

        Raises:
            RequestTimeoutError: not finished within ``timeout_s``.
        """
        req = self._prepare(prompt, params, adapter, timeout_s)
        items: queue.Queue = queue.Queue()
        req.sink = items.put
        self._scheduler.submit(req)
        collected = Collector(params.n)
        try:
            while True:
                wait = None if req.deadline is None else max(0.0, req.deadline - time.monotonic()) + _CALLER_GRACE_S
                try:
                    item = items.get(timeout=wait)
                except queue.Empty:
                    raise timeout_error() from None
                if isinstance(item, BaseException):
                    raise item
                done = collected.add(item)
                if done is not None:
                    return done
        finally:
            req.cancel.set()  # no-op when finished; frees the slot when the caller gave up

    async def agenerate(
        self, prompt: Prompt, params: SamplingParams, adapter: str | None = None, timeout_s: float | None = None
    ) -> Completion:
        """:meth:`generate` for asyncio callers; cancelling the caller frees the request's batch slot."""
        collected = Collector(params.n)
        async for d in self.astream(prompt, params, adapter, timeout_s):
            done = collected.add(d)
            if done is not None:
                return done
        raise RuntimeError("the engine ended a request without a final delta")

    async def astream(
        self, prompt: Prompt, params: SamplingParams, adapter: str | None = None, timeout_s: float | None = None
    ) -> AsyncIterator[Delta]:
        """Text deltas as they are decoded (with ``n`` > 1, every choice's, interleaved, each carrying its
        ``index``); each choice's last delta carries its finish_reason and token counts.

        Closing the iterator early (a client that went away) frees the request's slot at the next step.

        Raises:
            RequestTimeoutError: not finished within ``timeout_s`` (raised even if the engine thread is stuck).
        """
        req = await asyncio.to_thread(self._prepare, prompt, params, adapter, timeout_s)
        loop, items = asyncio.get_running_loop(), asyncio.Queue()

        def sink(item: Delta | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                req.cancel.set()

        req.sink = sink
        self._scheduler.submit(req)
        # One timer per request (not a timeout per awaited delta): it drops a marker into the queue.
        timer = None
        if req.deadline is not None:
            delay = max(0.0, req.deadline - time.monotonic()) + _CALLER_GRACE_S
            timer = loop.call_later(delay, items.put_nowait, _TIMED_OUT)
        unfinished, held = params.n, None
        try:
            while True:
                item = held if held is not None else await items.get()
                held = None
                # A consumer slower than the engine gets what has piled up as one delta per choice (fewer
                # messages downstream under load; one token at a time when it keeps up).
                while isinstance(item, Delta) and item.finish_reason is None and not items.empty():
                    nxt = items.get_nowait()
                    if isinstance(nxt, Delta) and nxt.index != item.index:
                        held = nxt  # another choice's: sent next
                        break
                    item = timeout_error() if nxt is _TIMED_OUT else join_deltas(item, nxt)
                if item is _TIMED_OUT:
                    raise timeout_error()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    unfinished -= 1
                    if not unfinished:
                        return
        finally:
            if timer is not None:
                timer.cancel()
            req.cancel.set()  # no-op when finished; frees the slot when the consumer left early

    def close(self) -> None:
        """Stop the engine thread; requests still waiting or running fail."""
        self._scheduler.close()

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

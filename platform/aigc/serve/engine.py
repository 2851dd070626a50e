"""The generation engine: one base model, many LoRA adapters, plain Python (no Serve needed).

A :class:`GenerationEngine` loads the base model and tokenizer once and wraps the model in a single peft
``PeftModel``. Adapters are loaded into it by name (:meth:`~GenerationEngine.load_adapter`) and every request
names the adapter it wants: generation calls ``model.generate(..., adapter_names=[name or "__base__"])``,
peft's mixed-adapter inference, where ``"__base__"`` is peft's name for "no adapter". Nothing ever calls the
global ``set_adapter``, so which adapter a request gets never depends on another request.

Two costs to know about:

1. peft implements ``adapter_names`` with forward hooks registered on the *shared* LoRA layers for the
   duration of one ``generate`` call, so two ``generate`` calls running at once in two threads overwrite each
   other's adapter choice. The engine therefore runs one ``generate`` at a time (``_model_lock``); requests
   of one replica queue on it. Batching requests together is a continuous-batching engine's job (roadmap).
2. An adapter can be deleted (Serve's LRU eviction) while a queued request still needs it. Requests
   :meth:`~GenerationEngine.acquire_adapter` it first; a delete only marks a busy adapter and the last
   :meth:`~GenerationEngine.release_adapter` (or the next generation) removes it.

Async generation (:meth:`~GenerationEngine.agenerate`, :meth:`~GenerationEngine.astream`) runs on the engine's
own generation thread, in arrival order, so a replica's asyncio loop keeps serving while the model works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from aigc.data.templates import render_prompt
from aigc.errors import AdapterLoadError, InvalidRequestError, ModelNotFoundError
from aigc.models.loading import load_base_model, load_tokenizer, model_id_for

__all__ = [
    "AdapterLoadError",
    "BASE_ADAPTER",
    "Completion",
    "Delta",
    "GenerationEngine",
    "InvalidRequestError",
    "ModelNotFoundError",
    "Prompt",
    "SamplingParams",
]

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # peft's reserved adapter name for "the base model, no adapter"
_PLACEHOLDER = "aigc_placeholder"  # a zero LoRA that keeps the PeftModel valid when no adapter is loaded

FinishReason = Literal["stop", "length"]
# A prompt is raw text (completions) or a conversation rendered by the chat template (chat completions).
Prompt = str | Sequence[dict[str, str]]


# ------------------------------------------------------------------------------------------- data classes
@dataclass(frozen=True)
class SamplingParams:
    """How to generate: ``temperature == 0`` is greedy, otherwise sampling with ``temperature``/``top_p``."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    """A finished generation; ``text`` excludes the eos token and anything from a stop string on."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Delta:
    """One streamed piece of text. The last delta has ``finish_reason`` and the token counts set."""

    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Job:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    params: SamplingParams
    adapter: str
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])


# ----------------------------------------------------------------------------------------- stop handling
def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where to cut ``text``: the start of the stop string that *completes* first, or None."""
    best: tuple[int, int] | None = None  # (end, start)
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    return None if best is None else best[1]


class _StopFilter:
    """Streams text with stop strings cut out: holds back any tail that could still become a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.buffer = ""
        self.hit = False

    def push(self, piece: str) -> str:
        if self.hit:
            return ""
        self.buffer += piece
        cut = _first_stop(self.buffer, self.stops)
        if cut is not None:
            out, self.buffer, self.hit = self.buffer[:cut], "", True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buffer)), hold, -1):
                if self.buffer.endswith(s[:k]):
                    hold = k
                    break
        out, self.buffer = self.buffer[: len(self.buffer) - hold], self.buffer[len(self.buffer) - hold :]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.hit else self.buffer), ""
        return out


class _StopCriteria:
    """A transformers stopping criterion: a stop string appeared in the new text, or the caller gave up."""

    def __init__(self, tokenizer: Any, prompt_len: int, stops: Sequence[str], cancel: threading.Event):
        self.tokenizer, self.prompt_len, self.stops, self.cancel = tokenizer, prompt_len, tuple(stops), cancel

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = self.cancel.is_set()
        if not done and self.stops:
            # Decoding all new tokens each step costs O(n^2) over a reply; at a few hundred tokens it is
            # well under the cost of the forward passes.
            text = self.tokenizer.decode(input_ids[0, self.prompt_len :], skip_special_tokens=True)
            done = any(s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


# ------------------------------------------------------------------------------------------------ engine
class GenerationEngine:
    """A base causal LM plus named LoRA adapters, generating for one request at a time.

    Args:
        model_name_or_path: hub id or local directory of the base model.
        dtype: ``auto`` (float32 on CPU, bf16/fp16 on GPU), ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu`` or ``cuda[:N]``.
        trust_remote_code: allow custom modelling code from the hub.
    """

    def __init__(
        self,
        model_name_or_path: str,
        dtype: str = "auto",
        device: str = "cpu",
        trust_remote_code: bool = False,
    ):
        from peft import LoraConfig, get_peft_model

        self.model_name_or_path = model_name_or_path
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code)
        base = load_base_model(model_name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        self.max_context: int | None = getattr(base.config, "max_position_embeddings", None)
        self._eos_ids = self._eos_token_ids(base)
        # The PeftModel exists from the start, holding a rank-1 zero LoRA on one linear layer: peft cannot
        # generate with a PeftModel whose last adapter was deleted, and this keeps one code path for all.
        first_linear = next(n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
        placeholder = LoraConfig(r=1, target_modules=f"^{re.escape(first_linear)}$", lora_dropout=0.0)
        self._model = get_peft_model(base, placeholder, adapter_name=_PLACEHOLDER).eval()

        self._model_lock = threading.Lock()  # one generate / load / delete at a time (see module docstring)
        # Async requests queue here, first come first served, instead of each parking a thread on the lock.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aigc-generate")
        self._state_lock = threading.Lock()  # guards the bookkeeping below; never held while the model runs
        self._loaded: set[str] = set()
        self._refs: dict[str, int] = {}
        self._doomed: set[str] = set()  # deleted while busy: removed when the last user releases it

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
        with self._state_lock:
            return sorted(self._loaded - self._doomed)

    # 1. adapters ----------------------------------------------------------------------------------------
    def load_adapter(self, path: str, adapter_name: str) -> None:
        """Load the PEFT adapter directory ``path`` under ``adapter_name`` (unique; letters, digits, ``_``).

        Raises:
            AdapterLoadError: the directory is not a LoRA adapter this engine can serve, or peft failed.
        """
        if not re.fullmatch(r"[A-Za-z0-9_-]+", adapter_name) or adapter_name in (BASE_ADAPTER, _PLACEHOLDER):
            raise ValueError(f"invalid adapter name {adapter_name!r}")
        _check_adapter_dir(path)
        with self._model_lock:
            self._purge_locked()
            with self._state_lock:
                if adapter_name in self._loaded:
                    raise ValueError(f"adapter {adapter_name!r} is already loaded")
            try:
                self._model.load_adapter(path, adapter_name=adapter_name, is_trainable=False)
            except Exception as exc:
                raise AdapterLoadError(f"could not load adapter from {path}: {exc}") from exc
            self._model.eval()
            with self._state_lock:
                self._loaded.add(adapter_name)
                self._refs[adapter_name] = 0

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; idempotent. A busy adapter is removed when its last request releases it.

        Blocks until a running generation finishes when the adapter is free (call it from a thread).
        """
        with self._state_lock:
            if adapter_name not in self._loaded:
                return
            self._doomed.add(adapter_name)
            free = self._refs.get(adapter_name, 0) == 0
        if free:
            with self._model_lock:
                self._purge_locked()

    def acquire_adapter(self, adapter_name: str) -> bool:
        """Mark the adapter in use by one request; False when it is not loaded or is being deleted."""
        with self._state_lock:
            if adapter_name not in self._loaded or adapter_name in self._doomed:
                return False
            self._refs[adapter_name] += 1
            return True

    def release_adapter(self, adapter_name: str) -> None:
        """End one request's use of the adapter (never blocks; a pending delete runs later)."""
        with self._state_lock:
            if self._refs.get(adapter_name, 0) > 0:
                self._refs[adapter_name] -= 1
        if self._model_lock.acquire(blocking=False):
            try:
                self._purge_locked()
            finally:
                self._model_lock.release()

    def _purge_locked(self) -> None:
        """Delete doomed adapters nobody uses any more (caller holds ``_model_lock``)."""
        with self._state_lock:
            ready = [n for n in self._doomed if self._refs.get(n, 0) == 0]
        for name in ready:
            self._model.delete_adapter(name)
            with self._state_lock:
                self._doomed.discard(name)
                self._loaded.discard(name)
                self._refs.pop(name, None)
            logger.info("deleted adapter %s", name)

    # 2. prompts -----------------------------------------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        """Raw text as is; a conversation through the tokenizer's chat template (the one training used)."""
        return prompt if isinstance(prompt, str) else render_prompt(self.tokenizer, prompt)

    def _prepare(self, prompt: Prompt, params: SamplingParams, adapter: str | None) -> _Job:
        text = self.render(prompt)
        # A chat template writes its own special tokens (bos...); raw prompts get the tokenizer's usual ones.
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=isinstance(prompt, str))
        n = int(enc["input_ids"].shape[1])
        param = "prompt" if isinstance(prompt, str) else "messages"
        if n == 0:
            raise InvalidRequestError("the prompt is empty", param=param)
        if self.max_context is not None and n + params.max_tokens > self.max_context:
            raise InvalidRequestError(
                f"this model's context is {self.max_context} tokens; the prompt has {n} and max_tokens asks "
                f"for {params.max_tokens} more. Shorten the prompt or lower max_tokens.",
                param=param,
                code="context_length_exceeded",
            )
        return _Job(
            input_ids=enc["input_ids"].to(self.device),
            attention_mask=enc["attention_mask"].to(self.device),
            params=params,
            adapter=adapter or BASE_ADAPTER,
        )

    # 3. generation --------------------------------------------------------------------------------------
    def _run(self, job: _Job, streamer: Any = None) -> torch.Tensor:
        """``generate`` for one job under the model lock; returns the new token ids."""
        p = job.params
        sampling: dict[str, Any] = {"do_sample": False}
        if p.temperature > 0:
            # top_k=0 turns off transformers' default top-k of 50, which OpenAI's API does not have.
            sampling = {"do_sample": True, "temperature": p.temperature, "top_p": p.top_p, "top_k": 0}
        criteria = [_StopCriteria(self.tokenizer, job.prompt_tokens, p.stop, job.cancel)]
        with self._model_lock:
            self._purge_locked()
            if job.cancel.is_set():  # the caller left while the job was queued
                if streamer is not None:
                    streamer.end()
                return job.input_ids.new_empty((0,))
            with self._state_lock:
                if job.adapter != BASE_ADAPTER and job.adapter not in self._loaded:
                    raise AdapterLoadError(f"adapter {job.adapter!r} is not loaded")
            if p.seed is not None:
                torch.manual_seed(p.seed)  # global RNG: safe because only one generate runs at a time
            out = self._model.generate(
                input_ids=job.input_ids,
                attention_mask=job.attention_mask,
                max_new_tokens=p.max_tokens,
                eos_token_id=self._eos_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                stopping_criteria=criteria,
                streamer=streamer,
                adapter_names=[job.adapter],
                **sampling,
            )
        return out[0, job.prompt_tokens :]

    def _finish(self, job: _Job, new_ids: torch.Tensor, stop_hit: bool) -> tuple[FinishReason, int]:
        ids = new_ids.tolist()
        hit_eos = bool(ids) and ids[-1] in self._eos_ids
        reason: FinishReason = "stop" if (stop_hit or hit_eos or len(ids) < job.params.max_tokens) else "length"
        return reason, len(ids)

    def generate(self, prompt: Prompt, params: SamplingParams, adapter: str | None = None) -> Completion:
        """Generate a whole reply (blocking). ``adapter`` None = the base model."""
        job = self._prepare(prompt, params, adapter)
        return self._generate_job(job)

    def _generate_job(self, job: _Job) -> Completion:
        new_ids = self._run(job)
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        cut = _first_stop(text, job.params.stop)
        if cut is not None:
            text = text[:cut]
        reason, n = self._finish(job, new_ids, stop_hit=cut is not None)
        return Completion(text=text, finish_reason=reason, prompt_tokens=job.prompt_tokens, completion_tokens=n)

    async def agenerate(self, prompt: Prompt, params: SamplingParams, adapter: str | None = None) -> Completion:
        """:meth:`generate` on the engine's generation thread; cancelling the caller stops it early."""
        job = self._prepare(prompt, params, adapter)
        fut = asyncio.get_running_loop().run_in_executor(self._worker, self._generate_job, job)
        try:
            return await fut
        except asyncio.CancelledError:
            job.cancel.set()  # a running job stops at the next token; a queued one never starts
            raise

    async def astream(self, prompt: Prompt, params: SamplingParams, adapter: str | None = None) -> AsyncIterator[Delta]:
        """Stream the reply as text deltas; the last :class:`Delta` carries finish_reason and token counts.

        The model runs on the engine's generation thread feeding a ``transformers.AsyncTextIteratorStreamer``,
        which releases text a word (or line) at a time, so a multi-byte character is never split. Closing
        the iterator early (a client that went away) stops the generation at the next token.
        """
        from transformers import AsyncTextIteratorStreamer

        job = self._prepare(prompt, params, adapter)
        streamer = AsyncTextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["ids"] = self._run(job, streamer)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                result["error"] = exc
                # Wake the consumer (generate() did not get to end the stream); its loop may be closed.
                with contextlib.suppress(RuntimeError):
                    streamer.end()

        fut = asyncio.get_running_loop().run_in_executor(self._worker, work)
        stops = _StopFilter(job.params.stop)
        try:
            async for piece in streamer:
                out = stops.push(piece)
                if out:
                    yield Delta(text=out)
            await fut
        finally:
            job.cancel.set()  # no-op when finished; stops the model if the consumer left early
            fut.cancel()  # and drops the job if it had not started yet
        if "error" in result:
            raise result["error"]
        tail = stops.flush()
        if tail:
            yield Delta(text=tail)
        reason, n = self._finish(job, result["ids"], stop_hit=stops.hit)
        yield Delta(finish_reason=reason, prompt_tokens=job.prompt_tokens, completion_tokens=n)

    # helpers ---------------------------------------------------------------------------------------------
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


def _check_adapter_dir(path: str) -> None:
    """Reject adapters mixed-adapter inference cannot run, with a message that says why."""
    cfg_file = Path(path) / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterLoadError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise AdapterLoadError(f"{cfg_file} is not valid JSON: {exc}") from exc
    if cfg.get("peft_type") != "LORA":
        raise AdapterLoadError(f"{path}: only LoRA adapters can be served, got peft_type={cfg.get('peft_type')}")
    if cfg.get("use_dora"):
        raise AdapterLoadError(f"{path}: DoRA adapters cannot be served per request (peft); merge it first")

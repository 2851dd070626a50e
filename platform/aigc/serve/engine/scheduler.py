"""The engine thread: admits waiting requests, runs decoding steps, samples and emits one token per row.

It owns the running batch and the queue of waiting requests; :class:`~aigc.serve.engine.core.GenerationEngine`
is the public face that prepares requests and waits for their deltas. How faults stay where they start is
described in :mod:`aigc.serve.engine.core`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any

import torch

from aigc.errors import AdapterLoadError, GenerationError, ServiceUnavailableError
from aigc.serve.engine.adapters import AdapterSet
from aigc.serve.engine.batch import Row, RunningBatch
from aigc.serve.engine.grammar import Grammars, mask_rows
from aigc.serve.engine.health import Liveness
from aigc.serve.engine.logprobs import LogprobTracker, step_logprobs, token_texts
from aigc.serve.engine.lora_batch import LoraForward
from aigc.serve.engine.requests import Request, timeout_error
from aigc.serve.engine.sampling import is_greedy, next_tokens
from aigc.serve.engine.text import IncrementalDetokenizer, StopFilter
from aigc.serve.engine.types import Delta, FinishReason

__all__ = ["Scheduler"]

logger = logging.getLogger(__name__)


class Scheduler:
    """The thread that runs the model for every request.

    Args:
        model: the peft model (every row's forward pass goes through it).
        model_lock: held for each step, adapter load or delete.
        adapters: the engine's adapters (pending deletes run between steps).
        tokenizer: detokenizes each row's tokens.
        eos_ids: token ids that end a row.
        max_batch_size, admit_min_rows, admit_max_wait_s, stall_timeout_s: as for the engine.
        lora: runs each forward with every row on its adapter (default: batched LoRA on ``model``).
    """

    def __init__(
        self,
        model: Any,
        model_lock: threading.Lock,
        adapters: AdapterSet,
        tokenizer: Any,
        eos_ids: set[int],
        *,
        max_batch_size: int,
        admit_min_rows: int,
        admit_max_wait_s: float,
        stall_timeout_s: float,
        lora: LoraForward | None = None,
    ):
        self._model_lock, self._adapters, self._tokenizer, self._eos_ids = model_lock, adapters, tokenizer, eos_ids
        self._token_text = token_texts(tokenizer)
        self._device = model.device
        self.max_batch_size, self.admit_min_rows = max_batch_size, admit_min_rows
        self.admit_max_wait_s = admit_max_wait_s
        self.batch = RunningBatch(model, pad_id=int(tokenizer.pad_token_id or 0), lora=lora)
        self.waiting: deque[Request] = deque()
        self.liveness = Liveness(stall_timeout_s)
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="aigc-engine", daemon=True)
        self._thread.start()

    def health(self) -> str | None:
        """Why this thread cannot serve (dead, stalled, failing passes, a broken model), or None."""
        if self._adapters.broken:
            self.liveness.mark_fatal(self._adapters.broken)
        busy = bool(self.waiting) or len(self.batch) > 0
        return self.liveness.problem(busy=busy, thread_alive=self._thread.is_alive() or self._closed)

    def close(self) -> None:
        """Stop the thread; requests still waiting or running fail."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout=30)

    def notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def submit(self, req: Request) -> None:
        problem = self.health()
        if problem is not None:  # a new request would hang or fail: let the caller try another replica
            raise ServiceUnavailableError(
                "this replica cannot generate right now and is being replaced; retry the request",
                code="replica_unhealthy",
            )
        with self._wake:
            if self._closed:
                raise ServiceUnavailableError("the engine is shutting down; retry the request", code="shutting_down")
            if not self.waiting and not len(self.batch):
                self.liveness.idle()  # work arrives at an idle engine: the stall clock starts now
            self.waiting.append(req)
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._closed or self.waiting or len(self.batch) or self._adapters.pending):
                    self.liveness.idle()
                    self._wake.wait()
                if self._closed:
                    break
                self._drop_expired_waiting()
                new = self._admissible()
            new = [r for r in new if not r.cancel.is_set()]
            with self._model_lock:
                self._adapters.purge_locked()  # none of these three raises: faults end requests, not the loop
                if new:
                    self._admit(new)
                if len(self.batch):
                    self._step()
        err = ServiceUnavailableError("the engine was closed; retry the request", code="shutting_down")
        for r in [*self.waiting, *(row.state for row in self.batch.rows)]:
            r.finish(err)

    def _drop_expired_waiting(self) -> None:
        """End waiting requests past their deadline (the caller holds ``_wake``)."""
        now = time.monotonic()
        if any(r.expired(now) for r in self.waiting):
            for r in [r for r in self.waiting if r.expired(now)]:
                self.waiting.remove(r)
                r.finish(timeout_error())

    def _admissible(self) -> list[Request]:
        """The waiting requests to prefill now (the caller holds ``_wake``); see the module doc.

        Counted in rows: a request with ``n`` choices takes ``n``. Requests are admitted in arrival order while
        their rows fit; an idle engine admits the first whatever its ``n`` (it could never fit otherwise).
        """
        free = self.max_batch_size - len(self.batch)
        room = min(free, sum(r.params.n for r in self.waiting))
        if room <= 0:
            return []
        if (
            len(self.batch)
            and room < self.admit_min_rows
            and time.monotonic() - self.waiting[0].arrived < self.admit_max_wait_s
        ):
            return []
        out, rows = [], 0
        while self.waiting and (rows + self.waiting[0].params.n <= free or not (out or len(self.batch))):
            rows += self.waiting[0].params.n
            out.append(self.waiting.popleft())
        return out

    def _admit(self, reqs: list[Request]) -> None:
        groups = []  # per request, a row per choice: the prompt is prefilled once, then forked
        for r in reqs:
            if not self._adapters.is_loaded(r.adapter):
                r.finish(AdapterLoadError(f"adapter {r.adapter!r} is not loaded"))
                continue
            groups.append([self._row(choice) for choice in r.fork()])
        if groups:
            self._prefill(groups)

    def _row(self, r: Request) -> Row:
        """A batch row for one choice, with its own RNG, detokenizer, stop filter and log-probability tracker."""
        p = r.params
        gen = None
        if not is_greedy(p):
            gen = torch.Generator(device=self._device)
            gen.manual_seed(p.seed if p.seed is not None else int.from_bytes(os.urandom(7), "big"))
        r.detok, r.stops = IncrementalDetokenizer(self._tokenizer), StopFilter(p.stop)
        r.logprobs = None if p.logprobs is None else LogprobTracker(self._token_text)
        r.matcher = None if r.grammar is None else Grammars.matcher(r.grammar)
        return Row(r.prompt_ids, r.adapter, p.temperature, p.top_p, p.top_k, gen, p.logprobs, state=r)

    def _prefill(self, groups: list[list[Row]], retry: bool = False) -> None:
        """Prefill each group's prompt once, fork it for the group's choices and join them to the batch; on
        failure, find the request at fault by trying each alone.

        Args:
            retry: this is one request of a failed group, tried alone (its failure is not counted again).
        """
        rows = [row for g in groups for row in g]
        self.liveness.begin()
        try:
            new = self.batch.prefill([g[0] for g in groups]).fork(rows, [len(g) for g in groups])
        except Exception as exc:
            self.liveness.failed(exc, count=not retry)
            if len(groups) > 1:  # costs one pass per request, only after a failure
                for g in groups:
                    self._prefill([g], retry=True)
                return
            logger.error("prefill failed for one request (adapter %s)", rows[0].adapter, exc_info=exc)
            for row in rows:
                row.state.finish(exc)
            return
        self.liveness.passed()
        before = len(self.batch)
        try:
            self.batch.join(new)
        except Exception as exc:  # merging caches failed: the running batch's cache is no longer trustworthy
            self._fail_batch(exc, [*self.batch.rows, *rows])
            return
        self._emit_all(rows, new.logits, leading=before)

    def _step(self) -> None:
        now = time.monotonic()
        for row in self.batch.rows:
            if row.state.expired(now):
                row.state.finish(timeout_error())
        # Clients that left and requests past their deadline free their slot before the forward pass.
        self.batch.keep([not (row.state.cancel.is_set() or row.state.done) for row in self.batch.rows])
        if not len(self.batch):
            return
        rows = self.batch.rows
        self.liveness.begin()
        try:
            logits = self.batch.decode()
        except Exception as exc:
            self._fail_batch(exc, rows)
            return
        self.liveness.passed()
        self._emit_all(rows, logits)

    def _fail_batch(self, exc: Exception, rows: list[Row]) -> None:
        """A pass shared by ``rows`` failed: end them all (retryable), drop the batch, count the failure."""
        logger.error("a forward pass shared by %d requests failed", len(rows), exc_info=exc)
        self.liveness.failed(exc)
        err = ServiceUnavailableError(
            "generation failed on this replica for every request in its batch; retry the request",
            code="batch_failed",
        )
        for row in rows:
            row.state.finish(err)
        self.batch.clear()

    def _emit_all(self, rows: list[Row], logits: torch.Tensor, leading: int = 0) -> None:
        """Sample and emit one token per row; a row whose token or text fails ends alone.

        Args:
            leading: live rows before ``rows`` in the batch (kept as they are: rows that just joined).
        """
        keep = [True] * leading
        # Rows with a response format: forbidden tokens to -inf in their logits, before sampling and log-probabilities.
        constrained = [(i, row.state.matcher) for i, row in enumerate(rows) if row.state.matcher is not None]
        try:
            dead = mask_rows(logits, constrained) if constrained else {}
        except Exception as exc:  # never the batch's failure: the constrained rows end with it
            dead = dict.fromkeys((i for i, _ in constrained), exc)
        tokens = next_tokens(logits, rows)
        for i, exc in dead.items():
            tokens[i] = exc
        try:  # only rows that asked pay (see aigc.serve.engine.logprobs)
            figures = step_logprobs(logits, [row.logprobs for row in rows], tokens)
        except Exception as exc:  # never the batch's failure: the rows that asked end with it
            figures = [None] * len(rows)
            tokens = [exc if row.logprobs is not None else t for row, t in zip(rows, tokens, strict=True)]
        for row, token, lp in zip(rows, tokens, figures, strict=True):
            try:
                if isinstance(token, BaseException):
                    raise token
                keep.append(self._emit(row, token, lp))
            except Exception as exc:
                logger.error("one request failed while decoding (adapter %s)", row.adapter, exc_info=exc)
                row.state.finish(exc)
                keep.append(False)
        self.batch.keep(keep)

    def _emit(self, row: Row, token: int, figures: Any = None) -> bool:
        """Record one token for ``row``, send what text it completes; False when the row is finished."""
        r: Request = row.state
        row.tokens.append(token)
        n, p, lps = len(row.tokens), r.params, r.logprobs
        reason: FinishReason | None = None
        if r.matcher is not None and not r.matcher.accept_token(token):  # the mask allowed it: never expected
            raise GenerationError("the sampled token breaks the response format", code="grammar_rejected")
        if token in self._eos_ids:
            reason = "stop"
        else:
            piece = r.detok.push(token)
            if lps is not None:
                lps.add(token, figures, piece)
            out = r.stops.push(piece)
            if out:  # counts so far travel with every delta (usage for a stream cut short downstream)
                r.sink(Delta(out, None, len(r.prompt_ids), n, r.index, None if lps is None else lps.release(out)))
            if r.stops.hit:
                reason = "stop"
            elif n >= p.max_tokens:
                reason = "length"
        if reason is None and not r.cancel.is_set():
            return True
        tail = r.stops.flush()
        if tail:
            r.sink(Delta(tail, index=r.index, logprobs=None if lps is None else lps.release(tail)))
        r.finish(Delta(finish_reason=reason or "stop", prompt_tokens=len(r.prompt_ids), completion_tokens=n,
                       index=r.index, logprobs=None if lps is None else []))  # fmt: skip
        return False

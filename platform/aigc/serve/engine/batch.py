"""The running batch: rows join between decoding steps and leave as soon as they finish (continuous batching).

One forward pass decodes one token for every row, each row on its own LoRA adapter or the base model
(one batched product per LoRA layer, :mod:`aigc.serve.engine.lora_batch`). New requests are prefilled
together (left-padded) and their KV cache is merged into the running one, left-padded to a common length;
positions come from each row's attention mask, so padding never changes a row's result.

Finished rows leave lazily: a finished row is marked dead at once (it no longer counts, its output is never
read) and the cache is compacted only when new rows join (one copy serves both the merge and the removal) or
when dead rows make up half the batch. Copying the whole KV cache for every row that leaves was about a tenth
of a replica's time under load. Compaction also trims columns that are padding in every remaining row.

Built on transformers' ``DynamicCache`` and the model's own forward, and forward hooks on peft's LoRA layers;
all of it runs on the engine's single thread (the hooks sit on shared modules: two forwards at once would
mix their rows' adapters).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from aigc.serve.engine.adapters import BASE_ADAPTER
from aigc.serve.engine.lora_batch import LoraForward

__all__ = ["Prefill", "Row", "RunningBatch"]


@dataclass(eq=False)
class Row:
    """One request in the batch: its prompt, settings and what it produced so far."""

    prompt_ids: list[int]
    adapter: str
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None
    logprobs: int | None = None  # None = no log-probabilities; k = the alternatives reported per token
    tokens: list[int] = field(default_factory=list)
    state: Any = None  # the engine's per-request bookkeeping (sink, detokenizer, stop filter...)
    alive: bool = True  # False once finished: still in the cache until the next compaction, never read


@dataclass(eq=False)
class Prefill:
    """Rows prefilled apart from the running batch: their cache, mask and last-position logits."""

    rows: list[Row]
    cache: Any
    mask: torch.Tensor
    logits: torch.Tensor

    def fork(self, rows: list[Row], counts: list[int]) -> Prefill:
        """The prefill with its row ``i`` repeated ``counts[i]`` times, as ``rows`` (n choices of one prompt).

        The prompt ran through the model once; each choice gets a copy of its KV cache (a memory copy, no
        forward pass), because ``DynamicCache`` holds one contiguous tensor per layer with a row per sequence
        and decoding appends to every row: rows cannot share cache blocks as a paged cache would.
        """
        if all(c == 1 for c in counts):
            return Prefill(rows, self.cache, self.mask, self.logits)
        index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(self.mask.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        return Prefill(rows, self.cache, self.mask.index_select(0, index), self.logits.index_select(0, index))


class RunningBatch:
    """The rows decoding together and their KV cache. Call every method from the engine thread only.

    Args:
        model: a peft ``PeftModel`` around a causal LM.
        pad_id: the token id used for left padding (masked out; its value never matters).
        lora: runs each forward with every row on its adapter (default: batched LoRA on ``model``).
    """

    def __init__(self, model: Any, pad_id: int, lora: LoraForward | None = None):
        self.model, self.pad_id = model, pad_id
        self.lora = lora or LoraForward(model)
        # transformers 5.x names the cache argument `cache` (older versions: `past_key_values`); the
        # DynamicCache object is updated in place either way.
        forward = model.get_base_model().forward
        self._cache_kw = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        self._rows: list[Row] = []  # every row in the cache, dead ones included, in cache order
        self._live = 0
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [rows, cached positions]: 1 = a real token
        self.max_rows_seen = 0  # largest number of live rows that shared one step (for tests and stats)
        self.prefilled_rows = 0  # prompts run through prefill so far (n choices of one prompt count once)

    def __len__(self) -> int:
        """Live rows: the ones still generating."""
        return self._live

    @property
    def rows(self) -> list[Row]:
        """The live rows, in the order :meth:`decode` returns their logits."""
        return [r for r in self._rows if r.alive]

    @property
    def device(self) -> torch.device:
        return self.model.device

    # 1. join: prefill new rows (nothing changes if it fails), then merge their cache into the running one
    @torch.inference_mode()
    def prefill(self, rows: list[Row]) -> Prefill:
        """Prefill ``rows`` (left-padded, one forward) without touching the running batch.

        A failure here (one prompt too long for the device's memory, an adapter that raises) leaves the
        running rows as they were: only the rows being admitted are affected.
        """
        from transformers import DynamicCache

        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache()
        self.prefilled_rows += len(rows)
        out = self.lora(
            [r.adapter for r in rows],
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,  # only the last position's logits are sampled
            **{self._cache_kw: cache},
        )
        return Prefill(rows, cache, mask, out.logits[:, -1, :])

    @torch.inference_mode()
    def join(self, new: Prefill) -> None:
        """Append prefilled rows to the running batch."""
        self._merge(new.cache, new.mask)
        self._rows.extend(new.rows)
        self._live += len(new.rows)

    def _merge(self, cache: Any, mask: torch.Tensor) -> None:
        """Append a prefilled cache, dropping dead rows and all-padding columns in the same copy."""
        if self._cache is None or not self._live:
            self._rows, self._cache, self._mask = [], cache, mask
            return
        index, start = self._survivors()
        old_mask = self._select(self._mask, index, start, dim=1)
        width = max(old_mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            for name in ("keys", "values"):
                kept = self._select(getattr(mine, name), index, start, dim=2)
                setattr(mine, name, torch.cat([_left_pad(kept, width), _left_pad(getattr(theirs, name), width)]))
        self._mask = torch.cat([_left_pad(old_mask, width, dim=1), _left_pad(mask, width, dim=1)], dim=0)
        self._rows = [r for r in self._rows if r.alive]

    # 2. step: one token for every row
    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """Feed each row's last token; returns next-token logits ``[live rows, vocab]`` (order of :attr:`rows`).

        The forward pass is shared: if it raises, every row's cache may hold a partial step and the caller
        must end every row (:meth:`clear`).
        """
        # Dead rows (finished, not yet compacted away) are fed padding: their output is never read.
        last = [[r.tokens[-1] if r.alive else self.pad_id] for r in self._rows]
        last = torch.tensor(last, dtype=torch.long, device=self.device)
        positions = self._mask.sum(-1, keepdim=True)  # real tokens so far = this token's position
        mask = torch.cat([self._mask, torch.ones_like(last)], dim=1)
        self.max_rows_seen = max(self.max_rows_seen, self._live)
        out = self.lora(
            [r.adapter for r in self._rows],
            input_ids=last,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kw: self._cache},
        )
        self._mask = mask
        logits = out.logits[:, -1, :]
        if self._live == len(self._rows):
            return logits
        return logits[torch.tensor([i for i, r in enumerate(self._rows) if r.alive], device=self.device)]

    def clear(self) -> None:
        """Drop every row and the cache (after a failed shared step)."""
        for row in self._rows:
            row.alive = False
        self._rows, self._cache, self._mask, self._live = [], None, None, 0

    # 3. leave: mark finished rows dead; compact when they are half the batch
    def keep(self, keep: list[bool]) -> None:
        """Keep the live rows whose flag is True (flags in the order of :attr:`rows`); the rest leave."""
        if all(keep):
            return
        for row, k in zip(self.rows, keep, strict=True):
            if not k:
                row.alive = False
                row.adapter = BASE_ADAPTER  # its adapter may be deleted before the row leaves the cache
                self._live -= 1
        if not self._live:
            self._rows, self._cache, self._mask = [], None, None
        elif 2 * (len(self._rows) - self._live) >= len(self._rows):
            self._compact()

    def _compact(self) -> None:
        index, start = self._survivors()
        self._mask = self._select(self._mask, index, start, dim=1)
        for layer in self._cache.layers:
            layer.keys = self._select(layer.keys, index, start, dim=2)
            layer.values = self._select(layer.values, index, start, dim=2)
        self._rows = [r for r in self._rows if r.alive]

    def _survivors(self) -> tuple[torch.Tensor, int]:
        """Indices of the live rows, and the first cache column any of them uses."""
        index = torch.tensor([i for i, r in enumerate(self._rows) if r.alive], device=self.device)
        used = self._mask.index_select(0, index).sum(0) > 0
        return index, int(used.nonzero()[0])

    @staticmethod
    def _select(t: torch.Tensor, index: torch.Tensor, start: int, dim: int) -> torch.Tensor:
        return t.index_select(0, index).narrow(dim, start, t.shape[dim] - start)


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zeros on the left of ``dim`` up to ``width`` (padded cache entries are masked out)."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)

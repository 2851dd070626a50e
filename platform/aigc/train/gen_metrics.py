"""Generation metrics at eval: greedy answers to a sample of val prompts, scored by exact match and ROUGE-L.

Eval loss says how likely the reference answer is; these say whether the model actually writes it. Costs
``max_new_tokens`` forward passes per batch of prompts (with a KV cache), so keep ``train.eval_generation_samples``
small (tens).

Distributed: every rank passes the SAME sample list; rank ``r`` answers samples ``r, r + world_size, ...`` (the
list padded so every rank has as many), in batches, each for ``max_new_tokens`` steps or until every answer on
every rank has ended (decided together with an ``all_reduce`` each step). Every rank thus runs the same number of
forward passes, which FSDP needs (each forward is a collective). The answer is cut at its first end-of-sequence
token afterwards, and the per-rank sums are added with ``all_reduce``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "GenSample",
    "answer_scores",
    "generation_metrics",
    "generation_samples",
    "rank_indices",
    "take_generation_samples",
]


@dataclass(frozen=True)
class GenSample:
    """A prompt (token ids up to where the answer starts) and the reference answer's token ids."""

    prompt_ids: list[int]
    reference_ids: list[int]


def _segments(ids: Sequence[int], labels: Sequence[int], positions: Sequence[int] | None) -> list[tuple[list, list]]:
    """One (ids, labels) pair per example: a packed row splits where its position ids restart at 0."""
    ids, labels = [int(x) for x in ids], [int(x) for x in labels]
    if positions is None:
        return [(ids, labels)]
    starts = [i for i, p in enumerate(positions) if int(p) == 0] + [len(ids)]
    return [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:], strict=False) if b > a]


def _sample(ids: list[int], labels: list[int]) -> GenSample | None:
    """The last answer (last run of labelled tokens) and everything before it; None for documents (format
    ``text``: every token but the first is a target, so there is no prompt to answer)."""
    targets = [i for i, y in enumerate(labels) if y != -100]
    if not targets or all(y != -100 for y in labels[1:]):
        return None
    end = targets[-1] + 1
    start = end
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    if start == 0:
        return None
    return GenSample(prompt_ids=ids[:start], reference_ids=ids[start:end])


def generation_samples(rows: dict[str, Sequence], n: int) -> list[GenSample]:
    """The first ``n`` prompt/answer pairs in tokenized ``rows`` (columns ``input_ids``, ``labels`` with -100
    on prompt tokens, and ``position_ids`` for packed rows, whose examples each give a pair).

    Multi-turn examples give their last answer, with the earlier turns as the prompt. Rows without a prompt
    (plain-text documents) give none, so fewer than ``n`` may come back.
    """
    out: list[GenSample] = []
    positions = rows.get("position_ids")
    for i, (ids, labels) in enumerate(zip(rows["input_ids"], rows["labels"], strict=True)):
        for seg_ids, seg_labels in _segments(ids, labels, positions[i] if positions is not None else None):
            sample = _sample(seg_ids, seg_labels)
            if sample is not None:
                out.append(sample)
                if len(out) >= n:
                    return out
    return out


def take_generation_samples(datasets: dict[str, Any], n: int) -> list[GenSample]:
    """The first ``n`` val rows of ``datasets`` (Ray Datasets) as prompts and reference answers (none without
    val)."""
    if not n or "val" not in datasets:
        return []
    rows = datasets["val"].take(n)
    columns = {k: [r[k] for r in rows] for k in rows[0]} if rows else {"input_ids": [], "labels": []}
    return generation_samples(columns, n)


def rank_indices(n: int, rank: int, world_size: int) -> list[int | None]:
    """The sample indices rank ``rank`` answers: ``rank, rank + world_size, ...``, padded with None so every
    rank gets ``ceil(n / world_size)`` entries (a None is answered too, for the forward-pass count, and not
    scored)."""
    per_rank = math.ceil(n / world_size) if n else 0
    return [i if i < n else None for i in range(rank, per_rank * world_size, world_size)]


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def _greedy(model: Any, prompts: list[list[int]], steps: int, pad_id: int, device: torch.device, autocast: Any,
            eos: set[int] | None = None, world_size: int = 1) -> list[list[int]]:  # fmt: skip
    """Up to ``steps`` greedy tokens for each prompt (left-padded batch, KV cache).

    Stops early once every answer of the batch has an ``eos`` token, on every rank together: with several
    ranks the decision is all-reduced each step, so all of them run the same number of forward passes (FSDP's
    forward is a collective). Calls the model itself (the DDP/FSDP wrapper's forward), not ``generate`` on the
    inner model, which would bypass FSDP's parameter gathering.
    """
    ids, mask = _left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos_ids = torch.tensor(sorted(eos or ()), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    collective = world_size > 1 and dist.is_available() and dist.is_initialized()
    cache: dict[str, Any] = {}
    out = []
    for _ in range(steps):
        with autocast():
            result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache)
        cache = {_cache_kwarg(model): getattr(result, "cache", None) or result.past_key_values}
        ids = result.logits[:, -1].argmax(-1, keepdim=True)
        out.append(ids)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        positions = positions[:, -1:] + 1
        if eos_ids.numel():
            done |= torch.isin(ids[:, 0], eos_ids)
            unfinished = (~done).sum().to(torch.float64)
            if collective:
                dist.all_reduce(unfinished)
            if unfinished.item() == 0:
                break
    return torch.cat(out, dim=1).tolist()


def _inner(model: Any) -> Any:
    """The transformers model inside DDP/FSDP and PEFT wrappers."""
    inner = model.module if hasattr(model, "module") else model
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _cache_kwarg(model: Any) -> str:
    """The KV-cache argument's name: ``cache`` from transformers 5.24 on, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(_inner(model).forward).parameters else "past_key_values"


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(_inner(model), "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return {i for i in ids if i is not None}


def _cut(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def _as_factory(autocast: Any) -> Callable[[], contextlib.AbstractContextManager]:
    """``autocast`` as a zero-argument factory: a factory (``contextlib.nullcontext``) as it is, a context
    manager object (``model_setup.autocast(wc, device)``) wrapped."""
    if isinstance(autocast, contextlib.AbstractContextManager):
        return lambda: autocast
    return autocast


def answer_scores(answer: str, reference: str, scorer: Any = None) -> tuple[float, float]:
    """(exact match, ROUGE-L F1) of one answer against its reference, both stripped of surrounding whitespace.

    Args:
        scorer: a ``rouge_score`` ``RougeScorer(["rougeL"])`` to reuse across calls (one is made when None).
    """
    if scorer is None:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
    answer, reference = answer.strip(), reference.strip()
    return float(answer == reference), scorer.score(reference, answer)["rougeL"].fmeasure


def generation_metrics(
    model: Any,
    samples: list[GenSample],
    tokenizer: Any,
    *,
    max_new_tokens: int,
    device: torch.device | str,
    rank: int,
    world_size: int,
    autocast: Any = contextlib.nullcontext,
    batch_size: int = 16,
) -> dict[str, float]:
    """Exact match and ROUGE-L F1 of greedy answers to ``samples``, averaged over all samples on all ranks.

    Args:
        model: the (possibly DDP/FSDP-wrapped) causal LM; put in eval mode for the call, then restored.
        samples: the same list on every rank (:func:`generation_samples`).
        tokenizer: decodes answers and references (special tokens skipped, whitespace stripped).
        max_new_tokens: most greedy steps per batch (fewer when every answer has ended; answers are cut at
            their first EOS afterwards).
        device: where the model is.
        rank, world_size: this rank's share; sums go through ``all_reduce`` when a process group is initialised
            (without one, the result covers this rank's share only).
        autocast: the forward pass's precision: a context-manager factory or a context manager.
        batch_size: prompts decoded together.

    Returns:
        ``{"eval_exact_match": ..., "eval_rouge_l": ...}`` in [0, 1] (0.0 when there are no samples).
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    device = torch.device(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos, factory = _eos_ids(model, tokenizer), _as_factory(autocast)
    mine = rank_indices(len(samples), rank, world_size)
    was_training = model.training
    model.eval()
    exact, rouge, count = 0.0, 0.0, 0.0
    try:
        for b in range(0, len(mine), batch_size):
            chunk = mine[b : b + batch_size]
            prompts = [samples[i if i is not None else 0].prompt_ids for i in chunk]
            answers = _greedy(model, prompts, max_new_tokens, pad_id, device, factory, eos, world_size)
            for i, tokens in zip(chunk, answers, strict=True):
                if i is None:
                    continue
                answer = tokenizer.decode(_cut(tokens, eos), skip_special_tokens=True)
                reference = tokenizer.decode(samples[i].reference_ids, skip_special_tokens=True)
                match, overlap = answer_scores(answer, reference, scorer)
                exact += match
                rouge += overlap
                count += 1
    finally:
        model.train(was_training)
    sums = torch.tensor([exact, rouge, count], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    exact, rouge, count = sums.tolist()
    return {"eval_exact_match": exact / max(count, 1.0), "eval_rouge_l": rouge / max(count, 1.0)}

"""Choosing each row's next token, with every numeric hazard handled per row.

One hostile or unlucky row must never fail its neighbours, so nothing here raises for the batch:
:func:`next_tokens` returns, per row, a token id or the exception that ends that row alone.

Guards (what other servers do, and why):

1. **Tiny temperatures decode greedily.** Logits are divided by the temperature; below
   :data:`MIN_TEMPERATURE` the division overflows float32 to ``inf`` (``temperature: 1e-38`` makes every
   score ``inf``, softmax ``nan``) while the distribution is already indistinguishable from greedy. vLLM
   (``_SAMPLING_EPS = 1e-5``) and TGI treat such temperatures as greedy too.
2. **Non-finite logits never reach sampling.** A row whose scores hold ``nan`` or ``+inf`` (a broken adapter, an
   overflow in its forward) fails with :class:`~aigc.errors.GenerationError`; greedy rows are checked too,
   as ``argmax`` over ``nan`` returns an arbitrary token.
3. **A distribution that vanished falls back to greedy.** After top-k/top-p masking the kept mass is
   positive by construction; if rounding ever leaves nothing, the row takes its argmax instead of raising
   inside ``torch.multinomial``.
"""

from __future__ import annotations

from typing import Any

import torch

from aigc.errors import GenerationError

__all__ = ["MIN_TEMPERATURE", "is_greedy", "next_tokens", "sample"]

MIN_TEMPERATURE = 1e-5  # below this a row decodes greedily (see the module doc)


def is_greedy(s: Any) -> bool:
    """Whether a row with these settings takes the argmax (temperature under the floor, or top-k of 1)."""
    return s.temperature < MIN_TEMPERATURE or s.top_k == 1


def sample(logits: torch.Tensor, s: Any) -> int:
    """The next token for one row: greedy below the temperature floor, else top-k / top-p with the row's RNG."""
    if is_greedy(s):
        return int(torch.argmax(logits))
    scores = logits.float() / s.temperature
    if s.top_k > 0:
        kth = torch.topk(scores, min(s.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        drop = probs.cumsum(-1) - probs >= s.top_p  # keep the smallest set reaching top_p (never the first)
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    total = float(probs.sum())
    if not total > 0 or total != total:  # guard 3: nothing left to sample from (nan or zero mass)
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs, 1, generator=s.generator))


def next_tokens(logits: torch.Tensor, rows: list[Any]) -> list[int | BaseException]:
    """The next token of every row, or the error that ends that row; never raises for the batch.

    Args:
        logits: ``[rows, vocab]`` scores of the last position.
        rows: objects with ``temperature``, ``top_p``, ``top_k`` and ``generator`` (in logits order).
    """
    # guard 2 (-inf is a legitimately masked token; nan and +inf are not scores)
    finite = (~(torch.isnan(logits) | torch.isposinf(logits)).any(-1)).tolist()
    greedy = logits.argmax(-1).tolist()
    out: list[int | BaseException] = []
    for i, (row, ok) in enumerate(zip(rows, finite, strict=True)):
        if not ok:
            out.append(GenerationError("the model produced non-finite scores for this request", code="non_finite"))
            continue
        try:
            out.append(greedy[i] if is_greedy(row) else sample(logits[i], row))
        except Exception as exc:  # one row's settings: its error, never the batch's
            out.append(exc)
    return out

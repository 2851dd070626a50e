"""Turn captured feedback into preference pairs (``aigc feedback export --pairs``): the rows DPO/ORPO learn
from, the signal users actually give ("this answer is better than that one").

A pair is a prompt (the request's messages) with a ``chosen`` and a ``rejected`` assistant answer:

* **a correction over the answer it corrects**: the latest feedback on a completion carries a correction, which
  passes the content policy (a flagged one is left out as ``correction_flagged:<category>``) and differs from
  the served answer;
* **a well-rated answer over a badly-rated one to the same prompt** (rating > 0 over rating < 0, the same
  messages): every such combination of different answers, at most ``max_pairs_per_prompt`` per prompt (the
  rest counted as ``over_pair_cap``).

Left out and counted: a prompt with a single rated answer (``single_rating``), several answers all rated alike
(``tie``), or answers on one side only (``no_opposite_rating``: good and neutral, say); two ratings of the same
text (``same_answer``); text completions; and, as for the supervised export, ratings whose completion is gone or
that other keys sent. Both conversations of a pair pass the validation ``aigc preprocess`` applies, so the file
is accepted as it is (``data.format: messages`` with ``chosen``/``rejected``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from aigc import storage
from aigc.data.formats import RowError, to_example
from aigc.feedback.rated import ContentPolicy, rated_completions
from aigc.feedback.store import FeedbackStore, Rating

__all__ = ["PairsResult", "export_pairs"]

MAX_PAIRS_PER_PROMPT = 8


@dataclass
class PairsResult:
    """What a pairs export wrote and why other rated completions gave no pair."""

    path: str
    pairs: int
    from_corrections: int
    from_ratings: int
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count


def _answer(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _pair(messages: list[dict[str, Any]], chosen: str, rejected: str) -> tuple[dict[str, Any] | None, str]:
    """The pair row, or ``(None, reason)`` when either conversation would be rejected by preprocessing."""
    for answer in (chosen, rejected):
        try:
            to_example({"messages": [*messages, _answer(answer)]}, "messages")
        except RowError as exc:
            return None, exc.reason
    return {"messages": messages, "chosen": _answer(chosen), "rejected": _answer(rejected)}, ""


def export_pairs(
    store: FeedbackStore,
    output: str,
    *,
    keys: Collection[str] | None = None,
    policy: ContentPolicy | None = None,
    max_pairs_per_prompt: int = MAX_PAIRS_PER_PROMPT,
) -> PairsResult:
    """Write the preference pairs found in ``store`` as JSONL at ``output`` (whole or not at all).

    Args:
        store: the feedback store.
        output: the JSONL file to write (local or URI).
        keys: count only ratings sent with these API key names (None = every rating).
        policy: the content policy corrections must pass (None = no check).
        max_pairs_per_prompt: the most rating pairs one prompt gives (its first good and bad answers first).

    Pairs from corrections come first, in capture order, then pairs from ratings, per prompt in the order its
    first answer was captured: two exports of the same store are identical.

    Raises:
        StorageError: the store cannot be read or ``output`` cannot be written.
    """
    completions, latest, reasons = rated_completions(store, keys)
    rows: list[dict[str, Any]] = []
    by_prompt: dict[str, list[tuple[dict[str, Any], Rating]]] = defaultdict(list)
    corrected: set[str] = set()
    for c in completions:
        if c.get("object") != "chat.completion":
            reasons["text_completion"] += 1
            continue
        rating = latest[c["id"]]
        by_prompt[json.dumps(c["messages"], sort_keys=True)].append((c, rating))
        if rating.correction is None:
            continue
        corrected.add(c["id"])  # counted here, whatever comes of the correction
        flag = policy.check(rating.correction) if policy is not None else None
        if flag is not None:
            reasons[f"correction_flagged:{flag.category}"] += 1
            continue
        if rating.correction.strip() == c["answer"].strip():
            reasons["same_answer"] += 1
            continue
        row, why = _pair(c["messages"], rating.correction, c["answer"])
        reasons[why or "from_corrections"] += 1
        if row is not None:
            rows.append(row)

    for answers in by_prompt.values():
        good = [(c, r) for c, r in answers if r.rating > 0]
        bad = [(c, r) for c, r in answers if r.rating < 0]
        if not (good and bad):
            uncorrected = [c for c, _ in answers if c["id"] not in corrected]
            if len(answers) == 1:
                reasons["single_rating"] += len(uncorrected)
            elif uncorrected:
                reasons["tie" if len({r.rating for _, r in answers}) == 1 else "no_opposite_rating"] += 1
            continue
        made = 0
        for g, _ in good:
            for b, _ in bad:
                if g["answer"].strip() == b["answer"].strip():
                    reasons["same_answer"] += 1
                    continue
                if made == max_pairs_per_prompt:
                    reasons["over_pair_cap"] += 1
                    continue
                row, why = _pair(g["messages"], g["answer"], b["answer"])
                reasons[why or "from_ratings"] += 1
                if row is not None:
                    rows.append(row)
                    made += 1
    storage.write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    skipped = {k: v for k, v in sorted(reasons.items()) if v and not k.startswith("from_")}
    return PairsResult(output, len(rows), reasons["from_corrections"], reasons["from_ratings"], skipped)

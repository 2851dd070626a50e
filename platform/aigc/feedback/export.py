"""Turn rated completions into a fine-tuning dataset (``data.format: messages``), what ``aigc feedback export``
runs: the collect -> curate -> fine-tune loop's curate step.

A captured chat completion becomes one row ``{"messages": [<the request's messages>, <assistant answer>]}``
when its latest rating is at least ``min_rating`` (the answer as served), or when the latest feedback carries
a correction, whatever its rating (the correction replaces the answer: it is what the user wanted). With
``keys``, only ratings sent with those API keys count. A correction must pass the content policy (the
server's ``serve.moderation``): a flagged one is left out as ``correction_flagged:<category>``. Rows are
checked with the same validation ``aigc preprocess`` applies, so the file is accepted as it is. Rows it would
reject, text completions (no conversation to train a chat model on), ratings whose completion is gone and
completions rated only by other keys are counted by reason, not written; completions nobody rated are not
looked at. Before reading, ``serve.capture_retention_days`` is applied to the store
(:mod:`aigc.feedback.retention`), so an expired answer is never exported.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from aigc import storage
from aigc.config import PlatformConfig
from aigc.data.formats import RowError, to_example
from aigc.feedback.pairs import PairsResult, export_pairs
from aigc.feedback.rated import ContentPolicy, rated_completions
from aigc.feedback.retention import apply_retention, open_store
from aigc.feedback.store import MAX_RATING, FeedbackStore, Rating

__all__ = ["ExportResult", "export_dataset", "export_feedback", "row_for"]


@dataclass
class ExportResult:
    """What an export wrote: the file, its row count and why other rated completions were left out."""

    path: str
    rows: int
    corrected: int  # rows whose answer is a user's correction
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count


def row_for(
    completion: dict[str, Any], rating: Rating, min_rating: int, policy: ContentPolicy | None = None
) -> tuple[dict[str, Any] | None, str]:
    """The dataset row for one rated completion, or ``(None, reason)`` when it is left out."""
    if completion.get("object") != "chat.completion":
        return None, "text_completion"
    if rating.correction is not None:
        flag = policy.check(rating.correction) if policy is not None else None
        if flag is not None:
            return None, f"correction_flagged:{flag.category}"
        answer, why = rating.correction, "corrected"
    elif rating.rating >= min_rating:
        answer, why = completion["answer"], "rated"
    else:
        return None, "below_min_rating"
    row = {"messages": [*completion["messages"], {"role": "assistant", "content": answer}]}
    try:
        to_example(row, "messages")  # what preprocess will check
    except RowError as exc:
        return None, exc.reason
    return row, why


def export_dataset(
    store: FeedbackStore,
    output: str,
    min_rating: int = MAX_RATING,
    *,
    keys: Collection[str] | None = None,
    policy: ContentPolicy | None = None,
) -> ExportResult:
    """Write the rated completions of ``store`` as a messages-format JSONL file at ``output`` (whole or not at all).

    Args:
        store: the feedback store.
        output: the JSONL file to write (local or URI).
        min_rating: keep answers (not corrections) whose latest rating is at least this.
        keys: keep only ratings sent with these API key names (None = every rating, anonymous ones included).
        policy: the content policy corrections must pass (None = no check).

    Rows are ordered by capture time, then id, so two exports of the same store are identical.

    Raises:
        StorageError: the store cannot be read or ``output`` cannot be written.
    """
    completions, latest, reasons = rated_completions(store, keys)
    rows = []
    for c in completions:
        row, why = row_for(c, latest[c["id"]], min_rating, policy)
        reasons[why] += 1
        if row is not None:
            rows.append(row)
    storage.write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    skipped = {k: v for k, v in sorted(reasons.items()) if v and k not in ("rated", "corrected")}
    return ExportResult(path=output, rows=len(rows), corrected=reasons["corrected"], skipped=skipped)


def export_feedback(
    cfg: PlatformConfig,
    min_rating: int = MAX_RATING,
    output: str | None = None,
    *,
    policy: ContentPolicy | None,
    keys: Collection[str] | None = None,
    pairs: bool = False,
) -> ExportResult | PairsResult:
    """``aigc feedback export [--pairs]``: the store named by ``cfg.serve`` to ``output`` (default
    ``<output_dir>/feedback-export.jsonl``, or ``feedback-pairs.jsonl`` with ``pairs``), after applying
    ``serve.capture_retention_days``; prints a one-line report and the next command.

    Args:
        min_rating: keep answers rated at least this (supervised rows only).
        policy: the content policy corrections must pass (the CLI loads ``serve.moderation``); explicit, so
            a caller cannot skip the check by leaving it out: None means no check.
        keys: keep only ratings sent with these API key names.
        pairs: write preference pairs (:mod:`aigc.feedback.pairs`) instead of supervised rows.

    Raises:
        DataError: there is no feedback store where the config points (nothing was ever captured there).
        StorageError: the store cannot be read or ``output`` cannot be written.
    """
    store = open_store(cfg)
    apply_retention(store, cfg.serve.capture_retention_days)
    default = "feedback-pairs.jsonl" if pairs else "feedback-export.jsonl"
    out = storage.resolve(output) if output else storage.join(cfg.output_dir, default)
    if pairs:
        res: ExportResult | PairsResult = export_pairs(store, out, keys=keys, policy=policy)
        made = f"{res.pairs} preference pairs ({res.from_corrections} corrected, {res.from_ratings} from ratings)"
    else:
        res = export_dataset(store, out, min_rating, keys=keys, policy=policy)
        made = f"{res.rows} rows ({res.corrected} corrected)"
    left_out = ", ".join(f"{k}={v}" for k, v in res.skipped.items()) or "none"
    print(f"[feedback] {made} -> {res.path}; left out: {left_out}")
    if pairs:
        print(f"[feedback] preference-tune on it: aigc preprocess --config ... data.path={res.path} "
              "data.format=messages data.preference=true, then aigc train ... train.preference.method=dpo")  # fmt: skip
    else:
        print(f"[feedback] fine-tune on it: aigc preprocess --config ... data.path={res.path} data.format=messages")
    return res

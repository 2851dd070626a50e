"""Turn rated completions into a fine-tuning dataset (``data.format: messages``), what ``aigc feedback export``
runs: the collect -> curate -> fine-tune loop's curate step.

A captured chat completion becomes one row ``{"messages": [<the request's messages>, <assistant answer>]}``
when its latest rating is at least ``min_rating`` (the answer as served), or when the latest feedback carries
a correction, whatever its rating (the correction replaces the answer: it is what the user wanted). Rows are
checked with the same validation ``aigc preprocess`` applies, so the file is accepted as it is. Rows it would
reject, text completions (no conversation to train a chat model on) and ratings whose completion is gone are
counted by reason, not written; completions nobody rated are not looked at.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aigc import storage
from aigc.config import PlatformConfig
from aigc.data.formats import RowError, to_example
from aigc.errors import DataError
from aigc.feedback.store import MAX_RATING, FeedbackStore, Rating, feedback_dir_for

__all__ = ["ExportResult", "export_dataset", "export_feedback", "row_for"]


@dataclass
class ExportResult:
    """What an export wrote: the file, its row count and why other rated completions were left out."""

    path: str
    rows: int
    corrected: int  # rows whose answer is a user's correction
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count


def row_for(completion: dict[str, Any], rating: Rating, min_rating: int) -> tuple[dict[str, Any] | None, str]:
    """The dataset row for one rated completion, or ``(None, reason)`` when it is left out."""
    if completion.get("object") != "chat.completion":
        return None, "text_completion"
    if rating.correction is not None:
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


def export_dataset(store: FeedbackStore, output: str, min_rating: int = MAX_RATING) -> ExportResult:
    """Write the rated completions of ``store`` as a messages-format JSONL file at ``output`` (whole or not at all).

    Rows are ordered by capture time, then id, so two exports of the same store are identical.

    Raises:
        StorageError: the store cannot be read or ``output`` cannot be written.
    """
    latest = store.latest_ratings()
    found = {cid: store.completion(cid) for cid in latest}
    completions = sorted((c for c in found.values() if c), key=lambda c: (c.get("created", 0), c["id"]))
    rows, reasons = [], Counter({"completion_missing": sum(c is None for c in found.values())})
    for c in completions:
        row, why = row_for(c, latest[c["id"]], min_rating)
        reasons[why] += 1
        if row is not None:
            rows.append(row)
    storage.write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    skipped = {k: v for k, v in sorted(reasons.items()) if v and k not in ("rated", "corrected")}
    return ExportResult(path=output, rows=len(rows), corrected=reasons["corrected"], skipped=skipped)


def export_feedback(cfg: PlatformConfig, min_rating: int = MAX_RATING, output: str | None = None) -> ExportResult:
    """``aigc feedback export``: the store named by ``cfg.serve`` to ``output`` (default
    ``<output_dir>/feedback-export.jsonl``); prints a one-line report.

    Raises:
        DataError: there is no feedback store where the config points (nothing was ever captured there).
        StorageError: the store cannot be read or ``output`` cannot be written.
    """
    store = FeedbackStore(feedback_dir_for(cfg.serve.feedback_dir, cfg.output_dir))
    if not storage.exists(store.root):
        raise DataError(f"no feedback store at {store.root}: serve with serve.capture=true, or set serve.feedback_dir")
    out = storage.resolve(output) if output else storage.join(cfg.output_dir, "feedback-export.jsonl")
    res = export_dataset(store, out, min_rating)
    left_out = ", ".join(f"{k}={v}" for k, v in res.skipped.items()) or "none"
    print(f"[feedback] {res.rows} rows ({res.corrected} corrected) -> {res.path}; left out: {left_out}")
    print(f"[feedback] fine-tune on it: aigc preprocess --config ... data.path={res.path} data.format=messages")
    return res

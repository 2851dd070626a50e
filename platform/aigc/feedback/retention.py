"""Deleting captured answers and their feedback: after ``serve.capture_retention_days``, and on demand
(``aigc feedback delete --before DATE | --key NAME``).

Retention is applied in two places: each ingress replica sweeps the store once an hour
(:class:`aigc.serve.feedback.FeedbackCapture`), and ``aigc feedback export`` applies it before it reads, so an
expired answer is never exported even when no server is running. A completion's age is its ``created`` time
(when it was captured); its ratings go with it, however recent.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from aigc import storage
from aigc.config import PlatformConfig
from aigc.errors import DataError
from aigc.feedback.store import FeedbackStore, Removed, feedback_dir_for

__all__ = ["DAY_S", "apply_retention", "delete_feedback", "open_store", "retention_cutoff"]

DAY_S = 86_400


def open_store(cfg: PlatformConfig) -> FeedbackStore:
    """The feedback store ``cfg.serve`` names.

    Raises:
        DataError: there is no store there (nothing was ever captured).
    """
    store = FeedbackStore(feedback_dir_for(cfg.serve.feedback_dir, cfg.output_dir))
    if not storage.exists(store.root):
        raise DataError(f"no feedback store at {store.root}: serve with serve.capture=true, or set serve.feedback_dir")
    return store


def retention_cutoff(days: float, now_s: float | None = None) -> float:
    """Seconds since the epoch before which a capture has expired."""
    return (time.time() if now_s is None else now_s) - days * DAY_S


def apply_retention(store: FeedbackStore, days: float | None, now_s: float | None = None) -> Removed:
    """Delete what was captured more than ``days`` ago, with its feedback (None = keep everything)."""
    if days is None:
        return Removed()
    removed = store.delete_before(retention_cutoff(days, now_s))
    if removed.completions or removed.ratings:
        print(f"[feedback] retention (serve.capture_retention_days={days:g}): removed {removed}")
    return removed


def delete_feedback(cfg: PlatformConfig, before: datetime | None = None, key: str | None = None) -> Removed:
    """``aigc feedback delete``: completions captured before ``before`` (with their ratings), or every
    completion made with the key named ``key`` (with their ratings) and every rating that key sent; prints what
    it removed.

    Raises:
        DataError: there is no feedback store where the config points.
        ValueError: neither or both of ``before`` and ``key`` given.
    """
    if (before is None) == (key is None):
        raise ValueError("give exactly one of before and key")
    store = open_store(cfg)
    if before is not None:
        when = before if before.tzinfo else before.replace(tzinfo=UTC)
        removed = store.delete_before(when.timestamp())
        what = f"captured before {when.isoformat()}"
    else:
        removed = store.delete_key(key)
        what = f"of API key '{key}'"
    print(f"[feedback] removed {removed} {what} from {store.root}")
    return removed

"""The rated completions a feedback export starts from (both exports: supervised rows and preference pairs),
and what an export needs of a content policy."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from typing import Any, Protocol

from aigc.feedback.store import FeedbackStore, Rating

__all__ = ["ContentPolicy", "rated_completions"]


class ContentPolicy(Protocol):
    """What the export needs of a content policy (``aigc.serve.moderation.load_policy`` returns one):
    ``check(text)`` gives None for acceptable text, else a flag with a ``category``."""

    def check(self, text: str) -> Any: ...


def rated_completions(
    store: FeedbackStore, keys: Collection[str] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Rating], Counter[str]]:
    """The rated completions still stored, ordered by capture time then id, each completion's latest rating
    (only ratings sent with ``keys`` count when given), and the counts of what was left out
    (``completion_missing``: rated, then removed; ``key_not_selected``: rated only by other keys)."""
    latest: dict[str, Rating] = {}
    other_keys: set[str] = set()
    for r in store.ratings():
        if keys is not None and r.key_name not in keys:
            other_keys.add(r.completion_id)
            continue
        cur = latest.get(r.completion_id)
        if cur is None or (r.created_ns, r.feedback_id) > (cur.created_ns, cur.feedback_id):
            latest[r.completion_id] = r
    found = {cid: store.completion(cid) for cid in latest}
    completions = sorted((c for c in found.values() if c), key=lambda c: (c.get("created", 0), c["id"]))
    reasons = Counter({"completion_missing": sum(c is None for c in found.values()),
                       "key_not_selected": len(other_keys - latest.keys())})  # fmt: skip
    return completions, latest, reasons

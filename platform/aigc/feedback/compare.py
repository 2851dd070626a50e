"""Each version's ratings side by side (``aigc feedback compare NAME``): how a candidate that gets a share of the
traffic (``aigc traffic``) does against the version it may replace, before ``aigc promote``.

Answers are attributed to the version that wrote them (a captured answer's ``model`` is the ``name:vN`` that
answered, whichever alias the request named). Per version: the rated answers, how many were rated good (1),
neutral (0) and bad (-1), how many were corrected, the mean rating, and the share rated good with its 95%
Wilson interval, so two versions whose intervals overlap are not told apart on this many ratings.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import asdict, dataclass

from aigc.feedback.rated import rated_completions
from aigc.feedback.store import FeedbackStore

__all__ = ["VersionRatings", "compare_table", "compare_versions"]

_Z95 = 1.959964


@dataclass
class VersionRatings:
    """The ratings of one version's answers (each answer's latest rating)."""

    model: str  # name:vN
    rated: int = 0
    good: int = 0
    neutral: int = 0
    bad: int = 0
    corrected: int = 0

    @property
    def mean(self) -> float:
        return (self.good - self.bad) / self.rated if self.rated else 0.0

    @property
    def good_interval(self) -> tuple[float, float]:
        """The 95% Wilson interval of the share rated good."""
        n = self.rated
        if not n:
            return 0.0, 1.0
        p = self.good / n
        centre = (p + _Z95**2 / (2 * n)) / (1 + _Z95**2 / n)
        half = _Z95 * math.sqrt(p * (1 - p) / n + _Z95**2 / (4 * n * n)) / (1 + _Z95**2 / n)
        return max(0.0, centre - half), min(1.0, centre + half)

    def to_json(self) -> dict:
        low, high = self.good_interval
        return {**asdict(self), "mean": round(self.mean, 4), "good_share_95": [round(low, 4), round(high, 4)]}


def compare_versions(store: FeedbackStore, name: str, keys: Collection[str] | None = None) -> list[VersionRatings]:
    """The ratings of every version of ``name`` that has rated answers, by ascending version.

    Args:
        keys: count only ratings sent with these API key names (None = every rating).
    """
    completions, latest, _ = rated_completions(store, keys)
    by_model: dict[str, VersionRatings] = {}
    for c in completions:
        model = str(c.get("model", ""))
        stem, _, version = model.partition(":v")
        if stem != name or not version.isdigit():
            continue
        row = by_model.setdefault(model, VersionRatings(model))
        r = latest[c["id"]]
        row.rated += 1
        row.good += r.rating > 0
        row.neutral += r.rating == 0
        row.bad += r.rating < 0
        row.corrected += r.correction is not None
    return sorted(by_model.values(), key=lambda v: int(v.model.rpartition(":v")[2]))


def compare_table(rows: list[VersionRatings]) -> str:
    """The comparison as a plain-text table."""
    head = f"{'version':<24} {'rated':>6} {'good':>5} {'neutral':>7} {'bad':>4} {'corrected':>9} {'mean':>6}"
    lines = [head + "  good share (95%)"]
    for v in rows:
        low, high = v.good_interval
        share = f"{v.good / v.rated:4.0%} ({low:.0%}-{high:.0%})" if v.rated else "-"
        lines.append(f"{v.model:<24} {v.rated:>6} {v.good:>5} {v.neutral:>7} {v.bad:>4} {v.corrected:>9} "
                     f"{v.mean:>+6.2f}  {share}")  # fmt: skip
    return "\n".join(lines)

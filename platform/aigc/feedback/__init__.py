"""Feedback on served answers: captured completions, user ratings and corrections, export to a dataset
(supervised rows, or preference pairs)."""

from aigc.feedback.export import ExportResult, export_dataset, export_feedback
from aigc.feedback.pairs import PairsResult, export_pairs
from aigc.feedback.retention import apply_retention, delete_feedback
from aigc.feedback.store import (
    FeedbackRequest,
    FeedbackStore,
    NotCompletionOwnerError,
    Rating,
    Removed,
    UnknownCompletionError,
    feedback_dir_for,
)

__all__ = [
    "ExportResult",
    "FeedbackRequest",
    "FeedbackStore",
    "NotCompletionOwnerError",
    "PairsResult",
    "Rating",
    "Removed",
    "UnknownCompletionError",
    "apply_retention",
    "delete_feedback",
    "export_dataset",
    "export_feedback",
    "export_pairs",
    "feedback_dir_for",
]

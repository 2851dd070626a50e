"""The feedback store: captured completions and the ratings users give them, one object per record.

Layout under ``feedback_dir`` (a local directory or ``s3://``/``gs://`` URI, through :mod:`aigc.storage`)::

    completions/<completion id>.json                    what was asked and answered (one per completion)
    ratings/<completion id>/<time ns>-<random>.json     one per feedback POST; the latest one wins

Every record is written whole or not at all (a temporary file renamed into place locally, one PUT on object
stores), so a process that dies mid-write leaves either the record or nothing; readers only look at ``*.json``
names and never see a temporary file. Records are never rewritten: a second rating is a new object, so
concurrent writers (several ingress replicas) cannot lose each other's records.

Rating scale: an integer, ``-1`` (bad answer), ``0`` (neutral) or ``1`` (good answer).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from aigc import storage
from aigc.errors import ServingError, StorageError

__all__ = [
    "MAX_COMMENT_CHARS",
    "MAX_CORRECTION_CHARS",
    "MAX_RATING",
    "MIN_RATING",
    "FeedbackRequest",
    "FeedbackStore",
    "Rating",
    "UnknownCompletionError",
    "feedback_dir_for",
]

MIN_RATING, MAX_RATING = -1, 1
MAX_CORRECTION_CHARS = 16_384  # a corrected answer: a long chat answer fits, a pasted book does not
MAX_COMMENT_CHARS = 2_000
# The ids the ingress hands out (schemas.new_id): also what keeps an id from naming any other path.
_ID = re.compile(r"^(chatcmpl|cmpl)-[0-9a-f]{32}$")


class UnknownCompletionError(ServingError, LookupError):
    """Feedback names a completion id this server never captured."""


def feedback_dir_for(serve_feedback_dir: str | None, output_dir: str) -> str:
    """``serve.feedback_dir``, or ``<output_dir>/feedback`` when it is not set (local paths made absolute here,
    where the config is loaded: replicas run elsewhere)."""
    return storage.resolve(serve_feedback_dir or storage.join(output_dir, "feedback"))


class FeedbackRequest(BaseModel):
    """The body of ``POST /v1/feedback``. Unknown fields are refused (a typo must not drop a correction)."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr = Field(description="The completion's id (chatcmpl-... or cmpl-...), as the response gave it.")
    rating: StrictInt = Field(
        ge=MIN_RATING, le=MAX_RATING, description="-1 = bad answer, 0 = neutral, 1 = good answer."
    )
    correction: StrictStr | None = Field(
        None, max_length=MAX_CORRECTION_CHARS, description="The answer the user wanted instead; trained on."
    )
    comment: StrictStr | None = Field(None, max_length=MAX_COMMENT_CHARS, description="Free text, never trained on.")

    @field_validator("correction")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty (leave it out to keep the answer)")
        return v


@dataclass(frozen=True)
class Rating:
    """One stored feedback record. ``created_ns`` orders them: the latest wins."""

    completion_id: str
    rating: int
    correction: str | None
    comment: str | None
    created_ns: int
    feedback_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.feedback_id,
            "object": "feedback",
            "completion_id": self.completion_id,
            "rating": self.rating,
            "correction": self.correction,
            "comment": self.comment,
            "created": self.created_ns // 1_000_000_000,
            "created_ns": self.created_ns,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Rating:
        return cls(d["completion_id"], d["rating"], d.get("correction"), d.get("comment"), d["created_ns"], d["id"])


class FeedbackStore:
    """Captured completions and their ratings under one directory or URI. Blocking: call it off the event loop.

    Args:
        root: the feedback directory (local path or ``s3://``/``gs://`` URI).

    Every method raises :class:`aigc.errors.StorageError` when the store cannot be read or written.
    """

    def __init__(self, root: str):
        self.root = storage.resolve(root)

    def _completion_path(self, completion_id: str) -> str:
        return storage.join(self.root, "completions", f"{completion_id}.json")

    # 1. capture ---------------------------------------------------------------------------------------
    def capture(self, record: dict[str, Any]) -> str:
        """Store one completion (``record["id"]`` names it); returns where it was written."""
        completion_id = record["id"]
        if not _ID.match(completion_id):
            raise ValueError(f"not a completion id: {completion_id!r}")
        path = self._completion_path(completion_id)
        _write(path, record)
        return path

    # 2. feedback --------------------------------------------------------------------------------------
    def add_feedback(self, req: FeedbackRequest) -> Rating:
        """Append one rating of a captured completion.

        Raises:
            UnknownCompletionError: no completion with ``req.id`` was captured (nothing is written).
            StorageError: the store cannot be read or written (nothing is written).
        """
        if not _ID.match(req.id) or not _guard(storage.is_file, self._completion_path(req.id)):
            raise UnknownCompletionError(f"no completion with id '{req.id}' was captured on this server", "id")
        now = time.time_ns()
        rating = Rating(req.id, req.rating, req.correction, req.comment, now, f"fb-{uuid.uuid4().hex}")
        # Zero-padded nanoseconds first: names sort in time order, so the latest is the last name.
        _write(storage.join(self.root, "ratings", req.id, f"{now:020d}-{rating.feedback_id}.json"), rating.to_json())
        return rating

    # 3. read back (export) ----------------------------------------------------------------------------
    def completion(self, completion_id: str) -> dict[str, Any] | None:
        """The captured completion, or None when it is gone (rated, then deleted by a retention policy)."""
        path = self._completion_path(completion_id)
        try:
            return storage.read_json(path)
        except OSError:
            if not _guard(storage.exists, path):
                return None
            raise StorageError(f"feedback store: cannot read {path}") from None

    def latest_ratings(self) -> dict[str, Rating]:
        """The latest rating of every rated completion, by completion id."""
        latest: dict[str, Rating] = {}
        for path in _guard(storage.list_files, storage.join(self.root, "ratings")):
            if not path.endswith(".json"):  # a temporary file left by a writer that died
                continue
            r = Rating.from_json(_guard(storage.read_json, path))
            cur = latest.get(r.completion_id)
            if cur is None or (r.created_ns, r.feedback_id) > (cur.created_ns, cur.feedback_id):
                latest[r.completion_id] = r
        return latest


def _guard(fn: Any, path: str) -> Any:
    """``fn(path)`` with any filesystem failure (pyarrow raises plain OSErrors) as a StorageError."""
    try:
        return fn(path)
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"feedback store: cannot access {path}: {exc}") from exc


def _write(path: str, record: dict[str, Any]) -> None:
    data = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
    _guard(lambda p: storage.write_bytes(p, data), path)

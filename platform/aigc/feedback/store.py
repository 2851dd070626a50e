"""The feedback store: captured completions and the ratings users give them, one object per record.

Layout under ``feedback_dir`` (a local directory or ``s3://``/``gs://`` URI, through :mod:`aigc.storage`)::

    completions/<completion id>.json                    what was asked and answered, and the API key's name
    ratings/<completion id>/key-<key name>.json         one rating per (API key, completion): a later one replaces it
    ratings/<completion id>/anonymous.json              the same, from a server that runs without keys

Provenance: a completion records the *name* of the API key that made it (``key_name``; None without keys) and
a rating the name of the key that sent it, never a key. Every record is written whole or not at all (a
temporary file renamed into place locally, one PUT on object stores), so a process that dies mid-write leaves
either the record or nothing, and readers only look at ``*.json`` names. A key's second rating of a completion
replaces its first in one such write (no read-modify-write), so concurrent posts leave exactly one whole
rating: the one written last. Stores written before ratings carried a key (``<time ns>-<random>.json``
names) are still read: per key, the latest record wins.

Deleting (:meth:`FeedbackStore.delete_before`, :meth:`FeedbackStore.delete_key`) removes a completion's ratings
before the completion itself, so a deletion cut short leaves nothing unreachable; a rating that lands between
the two (its completion was checked just before) is removed by the next deletion as an orphan.

Rating scale: an integer, ``-1`` (bad answer), ``0`` (neutral) or ``1`` (good answer).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

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
    "NotCompletionOwnerError",
    "Rating",
    "Removed",
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


class NotCompletionOwnerError(ServingError, PermissionError):
    """Feedback on a completion that another API key made (only its own key may rate or correct it)."""


@dataclass
class Removed:
    """What a deletion removed: completions (each with its ratings) and rating records in all."""

    completions: int = 0
    ratings: int = 0

    def __str__(self) -> str:
        return f"{self.completions} completions and {self.ratings} ratings"


def _rating_name(key_name: str | None) -> str:
    """The file name of a key's rating of one completion (names are escaped: never a path of their own)."""
    return "anonymous.json" if key_name is None else f"key-{quote(key_name, safe='')}.json"


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
    """One stored feedback record: ``key_name`` is the name of the API key that sent it (None without keys).
    ``created_ns`` orders ratings of one completion by different keys: the latest wins at export."""

    completion_id: str
    rating: int
    correction: str | None
    comment: str | None
    created_ns: int
    feedback_id: str
    key_name: str | None = None

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
            "key_name": self.key_name,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Rating:
        return cls(d["completion_id"], d["rating"], d.get("correction"), d.get("comment"), d["created_ns"], d["id"],
                   d.get("key_name"))  # fmt: skip


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
    def add_feedback(self, req: FeedbackRequest, key_name: str | None = None, owner_only: bool = False) -> Rating:
        """Store ``key_name``'s rating of a captured completion, replacing that key's earlier one.

        Args:
            req: the rating.
            key_name: the name of the API key that sent it (None: the server runs without keys).
            owner_only: refuse a completion another key made (``serve.feedback_from: owner``).

        Raises:
            UnknownCompletionError: no completion with ``req.id`` was captured (nothing is written).
            NotCompletionOwnerError: ``owner_only`` and another key made the completion (nothing is written).
            StorageError: the store cannot be read or written (nothing is written).
        """
        record = self.completion(req.id) if _ID.match(req.id) else None
        if record is None:
            raise UnknownCompletionError(f"no completion with id '{req.id}' was captured on this server", "id")
        if owner_only and record.get("key_name") != key_name:  # a record without one predates provenance
            raise NotCompletionOwnerError(
                f"the completion '{req.id}' was made with another API key: only the key that made a request may "
                "rate or correct its answer (serve.feedback_from: owner)",
                "id",
            )
        rating = Rating(req.id, req.rating, req.correction, req.comment, time.time_ns(), f"fb-{uuid.uuid4().hex}",
                        key_name)  # fmt: skip
        _write(storage.join(self.root, "ratings", req.id, _rating_name(key_name)), rating.to_json())
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

    def ratings(self) -> list[Rating]:
        """Every stored rating: one per (completion, key), ordered by completion id then key name."""
        latest: dict[tuple[str, str | None], Rating] = {}
        for path in _guard(storage.list_files, storage.join(self.root, "ratings")):
            if not path.endswith(".json"):  # a temporary file left by a writer that died
                continue
            r = Rating.from_json(_guard(storage.read_json, path))
            cur = latest.get((r.completion_id, r.key_name))
            if cur is None or (r.created_ns, r.feedback_id) > (cur.created_ns, cur.feedback_id):
                latest[(r.completion_id, r.key_name)] = r
        return [latest[k] for k in sorted(latest, key=lambda k: (k[0], k[1] or ""))]

    # 4. delete (retention, on demand) -----------------------------------------------------------------
    def delete_before(self, cutoff_s: float) -> Removed:
        """Remove every completion captured before ``cutoff_s`` (seconds since the epoch) with its ratings, and
        ratings whose completion is already gone."""
        removed = Removed()
        for completion_id, record in self._completions():
            if record.get("created", cutoff_s) < cutoff_s:
                self._remove_completion(completion_id, removed)
        self._remove_orphans(removed)
        return removed

    def delete_key(self, key_name: str) -> Removed:
        """Remove every completion made with the key named ``key_name`` (with all its ratings), and every rating
        that key sent on other completions."""
        removed = Removed()
        for completion_id, record in self._completions():
            if record.get("key_name") == key_name:
                self._remove_completion(completion_id, removed)
        name = _rating_name(key_name)
        for path in _guard(storage.list_files, storage.join(self.root, "ratings")):
            if path.rsplit("/", 1)[-1] == name:
                removed.ratings += _remove(path)
        return removed

    def _completions(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(id, record)`` of every captured completion (one listing, one read each)."""
        for path in _guard(storage.list_files, storage.join(self.root, "completions")):
            completion_id = path.rsplit("/", 1)[-1].removesuffix(".json")
            if path.endswith(".json") and _ID.match(completion_id):
                record = self.completion(completion_id)
                if record is not None:  # removed meanwhile (another replica's sweep)
                    yield completion_id, record

    def _remove_completion(self, completion_id: str, removed: Removed) -> None:
        ratings = storage.join(self.root, "ratings", completion_id)
        removed.ratings += sum(_remove(p) for p in _guard(storage.list_files, ratings) if p.endswith(".json"))
        _remove(ratings)
        removed.completions += _remove(self._completion_path(completion_id))

    def _remove_orphans(self, removed: Removed) -> None:
        for completion_id in _guard(storage.list_dirs, storage.join(self.root, "ratings")):
            if not _guard(storage.exists, self._completion_path(completion_id)):
                ratings = storage.join(self.root, "ratings", completion_id)
                removed.ratings += sum(_remove(p) for p in _guard(storage.list_files, ratings) if p.endswith(".json"))
                _remove(ratings)


def _remove(path: str) -> int:
    """Delete a file or directory tree; 1 when this call removed it, 0 when it was already gone."""
    try:
        if not storage.exists(path):
            return 0
        storage.remove_tree(path)
        return 1
    except OSError as exc:
        if not _guard(storage.exists, path):  # another replica removed it first
            return 0
        raise StorageError(f"feedback store: cannot delete {path}: {exc}") from exc


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

"""Fingerprints of a stage's inputs: the config it reads, the data's content and the upstream stage's fingerprint.

A fingerprint is a short SHA-256 of canonical JSON (sorted keys, no whitespace), so it changes exactly when a
value the stage reads changes: a key's value, a data file's bytes, or anything upstream (through the upstream
fingerprint). Key order in the YAML, comments and keys the stage does not read leave it as it is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from aigc import storage

__all__ = ["content_hash", "data_hash", "fingerprint"]

_LENGTH = 16  # hex digits kept: 64 bits, plenty to tell one run's inputs from the next


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(inputs: dict[str, Any], upstream: str | None = None) -> str:
    """The fingerprint of one stage: its ``inputs`` (JSON-able: config sections, hashes) and ``upstream``'s.

    Args:
        inputs: what the stage reads, e.g. ``{"train": cfg.train.model_dump(), "data": "3fa2..."}``.
        upstream: the fingerprint of the stage whose output this one consumes; None for a first stage.
    """
    h = hashlib.sha256(_canonical({"inputs": inputs, "upstream": upstream}).encode())
    return h.hexdigest()[:_LENGTH]


def data_hash(files: Iterable[dict[str, Any]]) -> str:
    """One hash of a dataset's content from its files' ``{source, sha256}`` (what
    :func:`aigc.data.input_files.hash_inputs` returns): renaming or moving a file keeps it, editing one changes it."""
    return fingerprint({"files": sorted([int(f["source"]), str(f["sha256"])] for f in files)})


def content_hash(path: str) -> str:
    """The SHA-256 of one file (local or URI), e.g. a search space the config names by path."""
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()[:_LENGTH]

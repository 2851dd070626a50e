"""The pipeline's record of its stages: ``<output_dir>/pipeline/state.json``, through :mod:`aigc.storage`.

One entry per stage, rewritten whole after each stage (a rename locally, one PUT on object stores), so a
pipeline killed at any point leaves the record of every stage that finished before it::

    {"stages": {"train": {"status": "done", "fingerprint": "3fa2...", "outputs": {...},
                          "elapsed_s": 41.2, "finished_at": 1767000000.0}, ...}}
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from aigc import storage
from aigc.errors import StorageError

__all__ = ["StageRecord", "PipelineState", "state_path"]

Status = Literal["done", "failed"]


def state_path(output_dir: str) -> str:
    return storage.join(output_dir, "pipeline", "state.json")


@dataclass
class StageRecord:
    """What the last attempt of one stage left: its outcome, the fingerprint it ran with, its outputs."""

    status: Status
    fingerprint: str
    outputs: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    finished_at: float = 0.0
    error: str | None = None


@dataclass
class PipelineState:
    """Every stage's last record, read from and written to one JSON file."""

    path: str
    stages: dict[str, StageRecord] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> PipelineState:
        """The record at ``path``; an empty one when there is none yet (or it cannot be parsed: every stage
        then runs again, which is slow but never wrong)."""
        if not storage.is_file(path):
            return cls(path)
        try:
            raw = storage.read_json(path)
            stages = {name: StageRecord(**rec) for name, rec in raw.get("stages", {}).items()}
        except (ValueError, TypeError, AttributeError, StorageError):
            return cls(path)
        return cls(path, stages)

    def done(self, name: str, fingerprint: str) -> StageRecord | None:
        """The stage's record if it last succeeded with this fingerprint."""
        rec = self.stages.get(name)
        return rec if rec is not None and rec.status == "done" and rec.fingerprint == fingerprint else None

    def record(self, name: str, rec: StageRecord) -> None:
        """Keep ``rec`` for ``name`` and write the whole state."""
        rec.finished_at = rec.finished_at or time.time()
        self.stages[name] = rec
        storage.write_json(self.path, {"stages": {n: vars(r) for n, r in self.stages.items()}}, indent=1)

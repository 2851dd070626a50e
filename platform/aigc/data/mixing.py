"""Exact deduplication and dataset mixture weights, applied to the tokenized rows as they stream by.

1. **Dedup** (``data.dedup``): every kept row carries ``key``, a hash of its normalized conversation (prompt
   and answer). :class:`KeySet` is one small Ray actor that remembers the keys seen so far; the first row with a
   key is kept, later ones are marked ``split="duplicate"`` and counted (not quarantined: they are not bad
   data, an identical copy is kept). Only the 8-byte keys travel to the actor, never the rows; its memory is
   about 100 bytes per distinct row (10 million rows ~ 1 GB). Which copy is kept depends on arrival order;
   the copies are identical up to whitespace and Unicode normalization.
2. **Weights** (``{path, weight}`` entries of ``data.path``): a train row of a source with weight ``w`` is
   written ``floor(w)`` times, plus once more when a stable hash of its key falls under ``w - floor(w)``; so
   ``2`` doubles a dataset, ``0.25`` keeps a quarter of it (the same quarter on every run), ``1`` leaves it as
   is. The count goes in the ``copies`` column, which the writer expands. Validation rows are never
   resampled: evaluation sees each source as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["KeySet", "copies_for", "expand_copies", "mark_rows"]


class KeySet:
    """Ray actor: the set of keys seen so far. ``first_seen(keys)`` marks the keys not seen before.

    A key repeated inside one call counts as seen after its first position.
    """

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def first_seen(self, keys: np.ndarray) -> np.ndarray:
        out = np.zeros(len(keys), dtype=bool)
        seen = self._seen
        for i, k in enumerate(keys.tolist()):
            if k not in seen:
                seen.add(k)
                out[i] = True
        return out

    def size(self) -> int:
        return len(self._seen)


def _unit_hash(keys: np.ndarray, seed: int) -> np.ndarray:
    """A stable value in [0, 1) per key (splitmix64 of key ^ seed), independent of the train/val hash."""
    x = keys.astype(np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


def copies_for(keys: np.ndarray, weights: np.ndarray, seed: int) -> np.ndarray:
    """How many times each row is written for its source's weight (see the module docstring)."""
    whole = np.floor(weights)
    return (whole + (_unit_hash(keys, seed) < weights - whole)).astype(np.int32)


def mark_rows(batch: pa.Table, keyset: Any | None, weights: list[float], seed: int) -> pa.Table:
    """Ray Data map_batches function: duplicates get ``split="duplicate"``, train rows their ``copies``.

    Args:
        batch: rows of :data:`aigc.data.tokenizing.OUT_SCHEMA` (with ``key`` and ``source``).
        keyset: a :class:`KeySet` actor handle, or None when dedup is off.
        weights: weight of each source, indexed by the ``source`` column.
        seed: data.seed, so a different seed draws a different subsample.
    """
    import ray

    split = batch["split"].to_numpy(zero_copy_only=False).astype(object)
    kept = np.isin(split, ["train", "val"])
    keys = batch["key"].to_numpy(zero_copy_only=False)
    if keyset is not None and kept.any():
        idx = np.flatnonzero(kept)
        first = ray.get(keyset.first_seen.remote(keys[idx]))
        split[idx[~first]] = "duplicate"
    copies = np.zeros(batch.num_rows, dtype=np.int32)
    train = split == "train"
    copies[split == "val"] = 1
    if train.any():
        w = np.asarray(weights, dtype=np.float64)[batch["source"].to_numpy(zero_copy_only=False)[train]]
        copies[train] = copies_for(keys[train], w, seed)
    out = batch.set_column(batch.schema.get_field_index("split"), "split", pa.array(split.tolist(), pa.string()))
    return out.append_column("copies", pa.array(copies, pa.int32()))


def expand_copies(table: pa.Table) -> pa.Table:
    """Each row repeated ``copies`` times (rows with 0 dropped); the ``copies`` column removed."""
    copies = table["copies"].to_numpy(zero_copy_only=False)
    out = table.drop_columns(["copies"])
    if (copies == 1).all():
        return out
    return out.take(pa.array(np.repeat(np.arange(table.num_rows), copies)))

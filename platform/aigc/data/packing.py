"""Packing tokenized rows into fewer, fuller rows of at most ``max_length`` tokens (``data.packing``).

A packed row holds several examples one after another and a ``position_ids`` column that restarts at 0 where
each one begins. Given ``position_ids`` and no ``attention_mask`` (and no KV cache), transformers builds a
block-diagonal causal mask from them (``masking_utils.find_packed_sequence_indices``; flash-attention
uses them as sequence boundaries), so no token attends to another example and each example's loss is what it
would be in a row of its own. The first token of each piece gets label -100: nothing before it in its own
sequence could predict it (in a row of its own it is never predicted either), so packing changes no loss.

Two kinds of rows, told apart by their labels:

* an **example** (the chat formats) has prompt tokens (label -100) and is never split: examples are placed
  into rows by best-fit decreasing (:func:`plan_rows`), so a row ends up 90%+ full once there are a few dozen
  short examples to choose from;
* a **document** (format ``text``, continued pretraining: every token is a target) is concatenated with the
  documents after it and the stream is cut into blocks of exactly ``max_length`` tokens; a document may run
  on into the next block (its position ids restart there too). The final partial block is dropped and its
  tokens counted.

Everything here is pure pyarrow/numpy on one table; the datasink calls it per write task and split.
"""

from __future__ import annotations

import bisect

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["PACKED_COLUMNS", "is_document", "pack", "pack_documents", "pack_examples", "plan_rows"]

PACKED_COLUMNS = ["input_ids", "labels", "position_ids", "n_tokens", "n_target_tokens", "n_examples"]


def _flat(col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(all values one after another, the length of each list) of a list column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    return values, lengths


def is_document(labels: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Per row: every token is a target (no label -100), i.e. a document of continued pretraining."""
    values, lengths = _flat(labels)
    return (_per_row(values == -100, lengths) == 0) & (lengths > 0)


def _per_row(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sum of ``values`` over each list of the given lengths."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return np.bincount(rows, weights=values.astype(np.float64), minlength=len(lengths)).astype(np.int64)


def plan_rows(lengths: np.ndarray, max_length: int) -> list[list[int]]:
    """Indices of the examples of each packed row (best-fit decreasing: longest first, into the fullest row
    that still has room). Rows come out longest-example first; inside a row, longest first.

    Raises:
        ValueError: an example is longer than ``max_length`` (the length policy should have cut it).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > max_length:
        raise ValueError(f"an example of {int(lengths.max())} tokens cannot be packed into rows of {max_length}")
    rows: list[list[int]] = []
    free: list[int] = []  # room left in each row that still has some, ascending
    owner: list[int] = []  # the row of each ``free`` entry
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(free, n)
        if k == len(free):
            row, room = len(rows), max_length - n
            rows.append([i])
        else:
            row, room = owner.pop(k), free.pop(k) - n
            rows[row].append(i)
        if room > 0:
            k = bisect.bisect_left(free, room)
            free.insert(k, room)
            owner.insert(k, row)
    return rows


def _table(
    ids: np.ndarray, labels: np.ndarray, pos: np.ndarray, row_lengths: np.ndarray, pieces: np.ndarray
) -> pa.Table:
    offsets = pa.array(np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int32))

    def lists(values: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(values.astype(np.int32), pa.int32()))

    row_targets = _per_row(labels != -100, row_lengths)
    cols = {
        "input_ids": lists(ids),
        "labels": lists(labels),
        "position_ids": lists(pos),
        "n_tokens": pa.array(row_lengths.astype(np.int32)),
        "n_target_tokens": pa.array(row_targets.astype(np.int32)),
        "n_examples": pa.array(pieces.astype(np.int32)),
    }
    return pa.table(cols)


def _positions(n: int, piece_starts: np.ndarray) -> np.ndarray:
    """0, 1, 2... restarting at each piece start."""
    idx = np.arange(n, dtype=np.int64)
    flag = np.zeros(n, dtype=bool)
    flag[piece_starts] = True
    return idx - np.maximum.accumulate(np.where(flag, idx, 0))


def pack_examples(table: pa.Table, max_length: int) -> pa.Table:
    """Examples (``input_ids``, ``labels`` list columns) packed whole into rows of at most ``max_length``."""
    lengths = pc.list_value_length(table["input_ids"]).fill_null(0).to_numpy(zero_copy_only=False)
    keep = np.flatnonzero(lengths > 0)
    rows = plan_rows(lengths[keep], max_length)
    order = keep[np.concatenate(rows)] if rows else keep
    picked = table.select(["input_ids", "labels"]).take(pa.array(order, pa.int64()))
    ids, ex_lengths = _flat(picked["input_ids"])
    labels, _ = _flat(picked["labels"])
    starts = np.cumsum(ex_lengths) - ex_lengths
    labels[starts] = -100
    row_lengths = np.array([int(lengths[keep[r]].sum()) for r in rows], dtype=np.int64)
    return _table(ids, labels, _positions(len(ids), starts), row_lengths, np.array([len(r) for r in rows]))


def pack_documents(table: pa.Table, max_length: int) -> tuple[pa.Table, int]:
    """Documents concatenated and cut into blocks of exactly ``max_length`` tokens; and the tokens of the final
    partial block, which are dropped."""
    ids_all, lengths = _flat(table["input_ids"])
    n_blocks = len(ids_all) // max_length
    kept = n_blocks * max_length
    doc_starts = (np.cumsum(lengths) - lengths)[lengths > 0]
    block_starts = np.arange(0, kept, max_length)
    piece_starts = np.union1d(doc_starts[doc_starts < kept], block_starts).astype(np.int64)
    ids = ids_all[:kept]
    labels = ids.copy()
    labels[piece_starts] = -100
    pieces = np.bincount(piece_starts // max_length, minlength=n_blocks) if kept else np.zeros(0, np.int64)
    table = _table(ids, labels, _positions(kept, piece_starts), np.full(n_blocks, max_length), pieces)
    return table, len(ids_all) - kept


def pack(table: pa.Table, max_length: int) -> tuple[pa.Table, int]:
    """Kept rows of one split packed: examples whole (:func:`pack_examples`), documents into full blocks
    (:func:`pack_documents`). Returns the packed rows and how many document tokens were dropped."""
    docs = is_document(table["labels"])
    examples = pack_examples(table.filter(pa.array(~docs)), max_length)
    blocks, dropped = pack_documents(table.filter(pa.array(docs)), max_length)
    return pa.concat_tables([examples, blocks]), dropped

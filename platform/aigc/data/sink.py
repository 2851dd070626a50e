"""Where the job's rows go, in the same streaming pass that produced them, and the counts stats.json reports.

:class:`SplitSink` is a Ray Data datasink: each write task splits its blocks by the ``split`` column and writes
``train/<n>.parquet``, ``val/<n>.parquet`` and ``quarantine/<n>.json`` (one JSON object per line: reason,
detail, raw) under the run's own shard directory, and returns small per-task counts: rows per split and per
rejection reason, token sums and a histogram of example lengths (``max_length + 1`` integers). The driver only
adds those up, so its memory does not grow with the data; the length percentiles come from the histogram
exactly. With ``packing`` each task packs its kept rows of a split (:mod:`aigc.data.packing`) before writing
them, and also counts packed rows, their tokens and the document tokens dropped. Rows marked by
:mod:`aigc.data.mixing` are honoured: ``split="duplicate"`` rows are counted, not written; a train row is
written ``copies`` times (mixture weights).

The sink never deletes: the directory is new for every run, and the job switches to it only on success.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink

from aigc import storage
from aigc.data.mixing import expand_copies
from aigc.data.packing import pack
from aigc.data.pair_tokenizing import PAIR_COLUMNS  # preference rows also have these

__all__ = ["KEPT_COLUMNS", "SPLITS", "SplitSink", "percentile"]

KEPT_COLUMNS = ["input_ids", "labels", "n_tokens", "n_target_tokens"]
SPLITS = ("train", "val", "quarantine")


def percentile(hist: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (linear interpolation) of the values that ``hist`` counts."""
    n = int(hist.sum())
    if n == 0:
        return 0.0
    cum = np.cumsum(hist)
    rank = q / 100 * (n - 1)
    lo, frac = int(np.floor(rank)), rank - np.floor(rank)
    v_lo = int(np.searchsorted(cum, lo + 1))
    v_hi = int(np.searchsorted(cum, min(lo + 2, n)))
    return v_lo + frac * (v_hi - v_lo)


class SplitSink(Datasink):
    """Writes the train/val/quarantine parts of a dataset of :data:`aigc.data.tokenizing.OUT_SCHEMA` rows.

    Args:
        shards_dir: a directory of this run alone; ``train``, ``val`` and ``quarantine`` are made under it.
        max_length: ``data.max_length`` (the histogram's range, and the packed row length).
        packing: pack kept rows into rows of up to ``max_length`` tokens (``data.packing``).
        n_sources: datasets of ``data.path``: rows in, kept and written are also counted per dataset.
    """

    def __init__(self, shards_dir: str, max_length: int, packing: bool = False, n_sources: int = 1):
        self.shards_dir, self.max_length, self.packing, self.n_sources = shards_dir, max_length, packing, n_sources
        self.totals: dict[str, Any] = {}

    def on_write_start(self, *args: Any, **kwargs: Any) -> None:
        for split in SPLITS:
            storage.makedirs(storage.join(self.shards_dir, split))

    def _path(self, split: str, ctx: Any, ext: str) -> tuple[Any, str]:
        return storage.filesystem(storage.join(self.shards_dir, split, f"part-{ctx.task_idx:06d}.{ext}"))

    def _per_source(self, table: pa.Table) -> np.ndarray:
        return np.bincount(table["source"].to_numpy(zero_copy_only=False), minlength=self.n_sources)

    def _write_split(self, part: pa.Table, split: str, ctx: Any, counts: dict[str, Any]) -> None:
        counts[f"rows_{split}"] = part.num_rows
        part = expand_copies(part)  # mixture weights: a train row written `copies` times
        counts[f"rows_{split}_written"] = part.num_rows
        counts[f"source_rows_{split}_written"] = self._per_source(part)
        if self.packing:
            part, dropped = pack(part, self.max_length)
            counts[f"packed_rows_{split}"] = part.num_rows
            counts["packed_tokens"] = counts.get("packed_tokens", 0) + int(pc.sum(part["n_tokens"]).as_py() or 0)
            counts["packed_tokens_dropped"] = counts.get("packed_tokens_dropped", 0) + dropped
        if part.num_rows:
            fs, path = self._path(split, ctx, "parquet")
            columns = KEPT_COLUMNS + [c for c in PAIR_COLUMNS if c in part.column_names]
            pq.write_table(part if self.packing else part.select(columns), path, filesystem=fs)

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
        tables = [b if isinstance(b, pa.Table) else pa.Table.from_pandas(b, preserve_index=False) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        counts: dict[str, Any] = {"rows_in": 0, "reasons": Counter(), "hist": np.zeros(self.max_length + 1, np.int64)}
        if not tables:
            return counts
        table = pa.concat_tables(tables)
        if "copies" not in table.column_names:  # no dedup, no weights: every kept row written once
            table = table.append_column("copies", pa.array(np.ones(table.num_rows, np.int32)))
        counts["rows_in"] = table.num_rows
        counts["source_rows_in"] = self._per_source(table)
        for split in ("train", "val"):
            self._write_split(table.filter(pc.equal(table["split"], split)), split, ctx, counts)
        counts["rows_duplicate"] = int(pc.sum(pc.equal(table["split"], "duplicate").cast(pa.int64())).as_py() or 0)
        kept = table.filter(pc.is_in(table["split"], pa.array(["train", "val"])))
        counts["rows_kept"] = kept.num_rows
        counts["source_rows_kept"] = self._per_source(kept)
        counts["rows_truncated"] = int(pc.sum(kept["truncated"].cast(pa.int64())).as_py() or 0)
        counts["rows_last_turn_only"] = int(pc.sum(kept["last_turn_only"].cast(pa.int64())).as_py() or 0)
        counts["tokens_total"] = int(pc.sum(kept["n_tokens"].cast(pa.int64())).as_py() or 0)
        counts["target_tokens_total"] = int(pc.sum(kept["n_target_tokens"].cast(pa.int64())).as_py() or 0)
        lengths = np.clip(kept["n_tokens"].to_numpy(), 0, self.max_length)
        counts["hist"] = np.bincount(lengths, minlength=self.max_length + 1)
        bad = table.filter(pc.invert(table["ok"])).select(["reason", "detail", "raw"])
        counts["reasons"] = Counter(bad["reason"].to_pylist())
        if bad.num_rows:
            fs, path = self._path("quarantine", ctx, "json")
            lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in bad.to_pylist())
            with fs.open_output_stream(path) as f:
                f.write("".join(lines).encode())
        return counts

    def on_write_complete(self, write_result: Any) -> None:
        totals: dict[str, Any] = {"reasons": Counter(), "hist": np.zeros(self.max_length + 1, np.int64)}
        for counts in write_result.write_returns:
            for key, value in counts.items():
                totals[key] = totals[key] + value if key in totals else value
        self.totals = totals

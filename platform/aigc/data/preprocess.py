"""The preprocessing job: raw records -> validated, templated, tokenized Parquet shards (Ray Data).

One streaming pass, each stage a Ray Data operator so the job scales from a laptop to a cluster unchanged:

1. read (:mod:`aigc.data.reading`): every record of every file of every ``data.path`` source becomes one JSON
   string with its source index (rows that cannot be read carry a ``read_error`` and are quarantined);
2. validate + template + tokenize (:mod:`aigc.data.rows`) in ``map_batches`` on an actor pool sized from the
   cluster's CPUs, one tokenizer call per batch; prompt tokens get label -100 so the loss covers only the
   answer; too-long examples are truncated or dropped (``data.overflow``); the train/val split is a hash of
   the prompt (stable across runs, no leakage of duplicated prompts);
3. write (:mod:`aigc.data.sink`) ``<output_dir>/data/{train,val}/*.parquet`` and quarantined rows to
   ``data/quarantine/*.json`` (one JSON object per line, with the reason) as the rows stream by, then
   ``data/stats.json`` and ``data/token_lengths.png`` from counts the write tasks return.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from aigc import storage
from aigc.config import DataConfig, ModelConfig
from aigc.data.reading import SUPPORTED_EXTENSIONS, check_columns, hash_inputs, list_input_files, read_raw
from aigc.data.rows import Tokenize as _Tokenize  # the row work, also run by bench/preprocess_throughput.py
from aigc.errors import DataError

__all__ = [
    "DataError",
    "PreprocessResult",
    "list_input_files",
    "preprocess",
    "read_stats",
    "SUPPORTED_EXTENSIONS",
]

_BATCH_ROWS = 1024  # rows per tokenizer call: large enough to amortize per-call costs, small blocks in flight


@dataclass
class PreprocessResult:
    data_dir: str
    stats: dict[str, Any]


def _fingerprint(inputs: list[dict[str, Any]], data: DataConfig, model: ModelConfig) -> str:
    """Same inputs (by content, in source order), same config, same tokenizer: same fingerprint."""
    h = hashlib.sha256()
    for f in inputs:
        h.update(f"{f['source']}:{f['sha256']}\n".encode())
    h.update(data.model_dump_json().encode() + model.name_or_path.encode())
    return h.hexdigest()[:16]


def _plot_lengths(hist: np.ndarray, max_length: int, path: str) -> None:
    """Histogram of kept example lengths, drawn from their counts (``hist[n]`` examples of ``n`` tokens)."""
    from aigc.plots import figure

    values = np.flatnonzero(hist)
    with figure(path, "Token lengths of kept examples", "tokens per example (prompt + answer)", "examples") as ax:
        ax.hist(values, bins=min(50, max(5, len(values))), weights=hist[values], color="#4477aa")
        ax.axvline(max_length, color="#cc3311", linestyle="--", label=f"data.max_length={max_length}")


def _actors(data: DataConfig) -> int:
    """data.tokenizer_actors, or one tokenizer actor per CPU of the cluster."""
    import ray

    return data.tokenizer_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))


def _stats(totals: dict[str, Any], data: DataConfig, model: ModelConfig, inputs: list[dict[str, Any]]) -> dict:
    from aigc.data.sink import percentile  # imports ray.data: only when the job runs

    hist = totals["hist"]
    kept = int(totals.get("rows_kept", 0))
    stats = {
        "rows_in": int(totals.get("rows_in", 0)),
        "rows_kept": kept,
        "rows_rejected": {str(k): int(v) for k, v in totals["reasons"].most_common()},
        "rows_truncated": int(totals.get("rows_truncated", 0)),
        "rows_last_turn_only": int(totals.get("rows_last_turn_only", 0)),  # see aigc.data.templates
        "rows_train": int(totals.get("rows_train", 0)),
        "rows_val": int(totals.get("rows_val", 0)),
        "tokens_total": int(totals.get("tokens_total", 0)),
        "target_tokens_total": int(totals.get("target_tokens_total", 0)),
        "tokens_per_example": {
            "mean": round(int(totals.get("tokens_total", 0)) / kept, 2) if kept else 0.0,
            "p50": int(percentile(hist, 50)),
            "p95": int(percentile(hist, 95)),
            "max": int(np.flatnonzero(hist).max()) if kept else 0,
        },
        "format": data.format,
        "max_length": data.max_length,
        "overflow": data.overflow,
        "inputs": inputs,  # {path, source, bytes, sha256} of every file read
        "tokenizer": model.name_or_path,
        "fingerprint": _fingerprint(inputs, data, model),
    }
    accounted = stats["rows_kept"] + sum(stats["rows_rejected"].values())
    if stats["rows_in"] != accounted or stats["rows_kept"] != stats["rows_train"] + stats["rows_val"]:
        raise DataError(
            f"preprocessing lost rows: {stats['rows_in']} read but {stats['rows_kept']} kept + "
            f"{accounted - stats['rows_kept']} rejected ({stats['rows_train']} train, {stats['rows_val']} val)"
        )
    return stats


def preprocess(data: DataConfig, model: ModelConfig, output_dir: str) -> PreprocessResult:
    """Run the preprocessing job on the current Ray cluster and return where it wrote and its stats.

    Raises:
        DataError: the input is missing, of an unsupported type, or not in the configured format; or every
            row was rejected.
    """
    import ray.data

    from aigc.data.sink import SplitSink

    files = list_input_files(data)
    check_columns(files, data)
    data_dir = storage.join(output_dir, "data")
    storage.makedirs(data_dir)

    hashes = hash_inputs(files)  # content hashes for the fingerprint, computed while the job runs
    raw = read_raw(files)
    rows = raw.map_batches(
        _Tokenize,
        fn_constructor_kwargs={"model": model.model_dump(), "data": data.model_dump()},
        batch_size=_BATCH_ROWS,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_actors(data)),
    )
    sink = SplitSink(data_dir, data.max_length)
    rows.write_datasink(sink)
    stats = _stats(sink.totals, data, model, ray.get(hashes))
    if stats["rows_kept"] == 0:
        raise DataError(
            f"data.path {data.path}: all {stats['rows_in']} rows were rejected {stats['rows_rejected']}; "
            f"see {storage.join(data_dir, 'quarantine')} for each row and its reason"
        )
    storage.write_json(storage.join(data_dir, "stats.json"), stats)
    with storage.local_staging(data_dir) as local:
        _plot_lengths(sink.totals["hist"], data.max_length, os.path.join(local, "token_lengths.png"))
    return PreprocessResult(data_dir=data_dir, stats=stats)


def read_stats(output_dir: str) -> dict[str, Any]:
    """stats.json of a preprocessed run; a clear error if preprocessing has not run."""
    path = storage.join(output_dir, "data", "stats.json")
    if not storage.is_file(path):
        raise DataError(f"no preprocessed data at {storage.join(output_dir, 'data')}: run `aigc preprocess` first")
    return storage.read_json(path)

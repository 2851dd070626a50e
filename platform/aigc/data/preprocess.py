"""The preprocessing job: raw records -> validated, templated, tokenized Parquet shards (Ray Data).

One streaming pass, each stage a Ray Data operator so the job scales from a laptop to a cluster unchanged:

1. read (:mod:`aigc.data.reading`): every record of every file of every ``data.path`` source becomes one JSON
   string with its source index (rows that cannot be read carry a ``read_error`` and are quarantined);
2. validate + template + tokenize (:mod:`aigc.data.tokenizing`) in ``map_batches`` on an actor pool sized from the
   cluster's CPUs, one tokenizer call per batch; prompt tokens get label -100 so the loss covers only the
   answer; too-long examples are truncated or dropped (``data.overflow``); the train/val split is a hash of
   the prompt (stable across runs, no leakage of duplicated prompts);
3. write (:mod:`aigc.data.sink`) ``<output_dir>/data/shards-<run>/{train,val}/*.parquet`` (packed with
   ``data.packing``, :mod:`aigc.data.packing`) and quarantined rows to ``shards-<run>/quarantine/*.json`` (one
   JSON object per line, with the reason) as the rows stream by, then ``data/token_lengths.png`` and, last,
   ``data/stats.json`` from counts the write tasks return.

Every run writes into a new ``shards-<run>`` directory and ``stats.json``, written last (one atomic write, also
on object stores), names it: readers go through :func:`read_stats` and :func:`shards_dir`, so a run that fails
leaves the previous run's data in use. After the switch only the oldest shard directories beyond
``data.keep_shard_sets`` are removed (never the one in use), so a training run or a sweep still streaming an
earlier set keeps its files; a failed run removes its own, except the quarantine of a run whose rows were all
rejected, which its error points to.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from aigc import storage
from aigc.config import DataConfig, ModelConfig
from aigc.data.pair_tokenizing import TokenizePairs as _TokenizePairs
from aigc.data.reading import IO_CPUS, SUPPORTED_EXTENSIONS, check_columns, hash_inputs, list_input_files, read_raw
from aigc.data.tokenizing import Tokenize as _Tokenize  # the row work, also run by bench/preprocess_throughput.py
from aigc.errors import DataError
from aigc.models.hub import resolve_model

__all__ = [
    "DataError",
    "PreprocessResult",
    "check_tokenized_for",
    "list_input_files",
    "preprocess",
    "read_stats",
    "dataset_rows",
    "shards_dir",
    "SUPPORTED_EXTENSIONS",
]

_BATCH_ROWS = 1024  # rows per tokenizer call: large enough to amortize per-call costs, small blocks in flight


@dataclass
class PreprocessResult:
    """``data_dir`` holds stats.json and the plot; ``shards_dir`` this run's train/val/quarantine."""

    data_dir: str
    stats: dict[str, Any]
    shards_dir: str


def _fingerprint(inputs: list[dict[str, Any]], data: DataConfig, model: ModelConfig) -> str:
    """Same inputs (by content, in source order), same config, same tokenizer (and hub commit): same fingerprint."""
    h = hashlib.sha256()
    for f in inputs:
        h.update(f"{f['source']}:{f['sha256']}\n".encode())
    # keep_shard_sets says how long old shards stay on disk, not what is in them
    h.update(data.model_dump_json(exclude={"keep_shard_sets"}).encode() + model.name_or_path.encode())
    if model.commit:  # a local directory has none: its fingerprint is what it was before commits were recorded
        h.update(f"@{model.commit}".encode())
    return h.hexdigest()[:16]


def _plot_lengths(hist: np.ndarray, max_length: int, path: str) -> None:
    """Histogram of kept example lengths, drawn from their counts (``hist[n]`` examples of ``n`` tokens)."""
    from aigc.plots import figure

    values = np.flatnonzero(hist)
    with figure(path, "Token lengths of kept examples", "tokens per example (prompt + answer)", "examples") as ax:
        ax.hist(values, bins=min(50, max(5, len(values))), weights=hist[values], color="#4477aa")
        ax.axvline(max_length, color="#cc3311", linestyle="--", label=f"data.max_length={max_length}")


def _actors(data: DataConfig) -> int:
    """The tokenizer pool's largest size: data.tokenizer_actors, or the cluster's CPUs minus one.

    Each actor holds a whole CPU for as long as the job runs; the CPU left over takes the read, dedup and write
    tasks (``IO_CPUS`` each), so a full pool never starves its own input (a pool as large as the cluster's CPUs
    left no room for reading and deadlocked when fixed in size; autoscaling up to it, it ran slower).
    """
    import ray

    return data.tokenizer_actors or max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)


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
        "rows_duplicate": int(totals.get("rows_duplicate", 0)),  # exact copies of a kept row (data.dedup)
        "rows_train": int(totals.get("rows_train", 0)),
        "rows_val": int(totals.get("rows_val", 0)),
        "rows_train_written": int(totals.get("rows_train_written", 0)),  # after mixture weights
        "tokens_total": int(totals.get("tokens_total", 0)),
        "target_tokens_total": int(totals.get("target_tokens_total", 0)),
        "tokens_per_example": {
            "mean": round(int(totals.get("tokens_total", 0)) / kept, 2) if kept else 0.0,
            "p50": int(percentile(hist, 50)),
            "p95": int(percentile(hist, 95)),
            "max": int(np.flatnonzero(hist).max()) if kept else 0,
        },
        "packing": _packing_stats(totals, data.max_length) if data.packing else None,
        "sources": _source_stats(totals, data),
        "format": data.format,
        "preference": data.preference,  # rows are chosen/rejected pairs (aigc.data.pairs)
        "max_length": data.max_length,
        "overflow": data.overflow,
        "inputs": inputs,  # {path, source, bytes, sha256} of every file read
        "tokenizer": model.name_or_path,
        "model_commit": model.commit,  # the hub commit tokenized with; None for a local directory
        "fingerprint": _fingerprint(inputs, data, model),
    }
    rejected = sum(stats["rows_rejected"].values())
    accounted = stats["rows_kept"] + stats["rows_duplicate"] + rejected
    if stats["rows_in"] != accounted or stats["rows_kept"] != stats["rows_train"] + stats["rows_val"]:
        raise DataError(
            f"preprocessing lost rows: {stats['rows_in']} read but {stats['rows_kept']} kept + "
            f"{stats['rows_duplicate']} duplicates + {rejected} rejected "
            f"({stats['rows_train']} train, {stats['rows_val']} val)"
        )
    return stats


def _source_stats(totals: dict[str, Any], data: DataConfig) -> list[dict[str, Any]]:
    """Per dataset of data.path: rows read, kept, and train rows written after its weight."""
    n = len(data.sources())

    def per(key: str) -> list[int]:
        return [int(v) for v in np.asarray(totals.get(key, np.zeros(n)), dtype=np.int64)]

    rows_in, kept, written = per("source_rows_in"), per("source_rows_kept"), per("source_rows_train_written")
    return [
        {"path": src.path, "format": src.format, "weight": src.weight, "rows_in": rows_in[i],
         "rows_kept": kept[i], "rows_train_written": written[i]}
        for i, src in enumerate(data.sources())
    ]  # fmt: skip


def _packing_stats(totals: dict[str, Any], max_length: int) -> dict[str, Any]:
    """Packed rows per split, and how full they are: tokens / (rows * max_length)."""
    rows = int(totals.get("packed_rows_train", 0)) + int(totals.get("packed_rows_val", 0))
    tokens = int(totals.get("packed_tokens", 0))
    return {
        "rows_train": int(totals.get("packed_rows_train", 0)),
        "rows_val": int(totals.get("packed_rows_val", 0)),
        "efficiency": round(tokens / (rows * max_length), 4) if rows else 0.0,
        "tokens_dropped": int(totals.get("packed_tokens_dropped", 0)),
    }


def _switch_to(data_dir: str, shards: str, stats: dict[str, Any], keep: int) -> None:
    """Make ``shards`` the data in use (stats.json names it), then remove the oldest other shard sets so that
    ``keep`` remain, ``shards`` among them.

    Names start with the run's start time (``shards-<YYYYmmdd-HHMMSS>-<hex>``), so name order is age order. A
    reader that opened an earlier set (a training run, a sweep's trials streaming it every epoch) keeps it until
    ``keep - 1`` newer sets have replaced it; the set in use is never removed, even when a run that started
    earlier switches last.
    """
    storage.write_json(storage.join(data_dir, "stats.json"), stats)
    names = storage.list_dirs(data_dir)  # sorted by name
    others = [n for n in names if n.startswith("shards-") and n != shards]
    stale = others[: max(0, len(others) - (keep - 1))]
    legacy = [n for n in names if n in ("train", "val", "quarantine")]  # the layout before shard directories
    for name in stale + legacy:
        storage.remove_tree(storage.join(data_dir, name))


def _describe(data: DataConfig) -> str:
    paths = [src.path for src in data.sources()]
    return paths[0] if len(paths) == 1 else f"({len(paths)} datasets: {', '.join(paths)})"


def _mix(rows: Any, data: DataConfig) -> Any:
    """Dedup and mixture weights (:mod:`aigc.data.mixing`) as one more streaming stage, when either is on."""
    import ray

    from aigc.data.mixing import KeySet, mark_rows

    weights = [src.weight for src in data.sources()]
    if not data.dedup and all(w == 1.0 for w in weights):
        return rows
    keyset = ray.remote(num_cpus=0)(KeySet).remote() if data.dedup else None
    return rows.map_batches(
        mark_rows,
        batch_format="pyarrow",
        fn_kwargs={"keyset": keyset, "weights": weights, "seed": data.seed},
        num_cpus=IO_CPUS,  # light: a set lookup per row, fused with the write
    )


def preprocess(data: DataConfig, model: ModelConfig, output_dir: str) -> PreprocessResult:
    """Run the preprocessing job on the current Ray cluster and return where it wrote and its stats.

    ``model`` is resolved here when the caller has not (a hub id pinned to one commit, its tokenizer files
    downloaded once): the tokenizer actors load that snapshot, never the hub id.

    Raises:
        DataError: the input is missing, of an unsupported type, or not in the configured format; or every
            row was rejected.
        ModelUnavailableError: the tokenizer cannot be had (:func:`aigc.models.hub.resolve_model`).
    """
    import ray.data

    from aigc.data.sink import SplitSink

    t0 = time.monotonic()
    model = resolve_model(model, weights=False)
    files = list_input_files(data)
    check_columns(files, data)
    data_dir = storage.join(output_dir, "data")
    storage.makedirs(data_dir)

    hashes = hash_inputs(files)  # content hashes for the fingerprint, computed while the job runs
    raw = read_raw(files)
    rows = raw.map_batches(
        _TokenizePairs if data.preference else _Tokenize,
        fn_constructor_kwargs={"model": model, "data": data},  # typed sections travel as they are
        batch_size=_BATCH_ROWS,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_actors(data)),
    )
    rows = _mix(rows, data)
    shards = f"shards-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    shards_path = storage.join(data_dir, shards)
    sink = SplitSink(shards_path, data.max_length, packing=data.packing, n_sources=len(data.sources()))
    keep_quarantine = False
    try:
        rows.write_datasink(sink, ray_remote_args={"num_cpus": IO_CPUS})
        stats = {**_stats(sink.totals, data, model, ray.get(hashes)), "shards": shards,
                 "seconds": round(time.monotonic() - t0, 2)}  # the job on a started cluster  # fmt: skip
        if stats["rows_kept"] == 0:
            keep_quarantine = True
            raise DataError(
                f"data.path {_describe(data)}: all {stats['rows_in']} rows were rejected {stats['rows_rejected']}; "
                f"see {storage.join(shards_path, 'quarantine')} for each row and its reason (the data of the "
                "previous run, if any, stays in use)"
            )
        with storage.local_staging(data_dir) as local:
            _plot_lengths(sink.totals["hist"], data.max_length, os.path.join(local, "token_lengths.png"))
    except BaseException:
        if keep_quarantine:  # every row rejected: the error points at this run's quarantine, keep only that
            storage.remove_tree(storage.join(shards_path, "train"))
            storage.remove_tree(storage.join(shards_path, "val"))
        else:
            storage.remove_tree(shards_path)
        raise
    _switch_to(data_dir, shards, stats, data.keep_shard_sets)
    return PreprocessResult(data_dir=data_dir, stats=stats, shards_dir=shards_path)


def read_stats(output_dir: str) -> dict[str, Any]:
    """stats.json of a preprocessed run; a clear error if preprocessing has not run."""
    path = storage.join(output_dir, "data", "stats.json")
    if not storage.is_file(path):
        raise DataError(f"no preprocessed data at {storage.join(output_dir, 'data')}: run `aigc preprocess` first")
    return storage.read_json(path)


def check_tokenized_for(stats: dict[str, Any], model: ModelConfig, output_dir: str) -> None:
    """The preprocessed data must be tokenized for ``model``: the same name and, for a hub id, the same commit
    (a branch that moved between preprocessing and training would otherwise train on another tokenizer).

    Raises:
        DataError: naming both, and the two ways on.
    """
    data_dir = storage.join(output_dir, "data")
    if stats.get("tokenizer") != model.name_or_path:
        raise DataError(
            f"{data_dir} was tokenized for {stats.get('tokenizer')!r} but model.name_or_path is "
            f"{model.name_or_path!r}: re-run `aigc preprocess` with this config"
        )
    tokenized = stats.get("model_commit")
    if tokenized and model.commit and tokenized != model.commit:
        raise DataError(
            f"{data_dir} was tokenized with {model.name_or_path} at commit {tokenized}, but it resolves to "
            f"{model.commit} now: set model.revision={tokenized} to train on the same commit, or re-run "
            "`aigc preprocess`"
        )


def shards_dir(output_dir: str, stats: dict[str, Any] | None = None) -> str:
    """The directory holding ``train``, ``val`` and ``quarantine`` of the run stats.json names.

    Raises:
        DataError: preprocessing has not run, or the shards stats.json names are gone.
    """
    stats = read_stats(output_dir) if stats is None else stats
    data_dir = storage.join(output_dir, "data")
    path = storage.join(data_dir, stats["shards"]) if "shards" in stats else data_dir  # the layout before runs
    if not storage.is_dir(path):
        raise DataError(f"{path}, named by {storage.join(data_dir, 'stats.json')}, is gone: re-run `aigc preprocess`")
    return path


def dataset_rows(stats: dict[str, Any], split: str) -> int:
    """Rows of the ``train`` or ``val`` dataset as written: packed rows with ``data.packing``, else examples."""
    packed = stats.get("packing")
    if packed:
        return int(packed[f"rows_{split}"])
    return int(stats.get(f"rows_{split}_written", stats.get(f"rows_{split}", 0)))

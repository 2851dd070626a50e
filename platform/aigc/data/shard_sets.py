"""The preprocessed shards as Ray Datasets for training: reading them, and whether to cache them in memory.

:func:`load_datasets` reads the train (and val) shards of the run ``stats.json`` names, for the model they were
tokenized for; :func:`cache_datasets` applies ``train.cache_data`` (read once into the object store, or streamed
from the shards every epoch). ``aigc train`` and a sweep's driver both go through them.
"""

from __future__ import annotations

import logging
from typing import Any

from aigc import storage
from aigc.config import ModelConfig
from aigc.data.preprocess import check_tokenized_for, dataset_rows, read_stats, shards_dir

__all__ = ["cache_datasets", "estimated_bytes", "load_datasets", "should_cache"]

_READ_CPUS = 0.25
_CACHE_SHARE = 0.2  # cache_data=auto: cache when the data takes under this share of the object store


def load_datasets(output_dir: str, model: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The preprocessed train (and val) shards under ``output_dir`` as Ray Datasets, and their ``stats.json``.

    The shards are those of the run stats.json names (a failed re-run of preprocessing leaves them in use).

    Raises:
        DataError: preprocessing has not run for ``output_dir``, or ran for another tokenizer than ``model``'s
            (or another hub commit).
    """
    import ray.data

    stats = read_stats(output_dir)
    # Per-epoch ingest bars of every worker's shard would drown the training metrics; Train reports progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    check_tokenized_for(stats, model, output_dir)

    # Reading shards is I/O: a quarter CPU per read task leaves the CPUs to the Train workers, so a cluster
    # full of trials cannot starve (and deadlock) the reads that feed them. Ray 2.60's default Parquet reader
    # (datasource V2) adds a file-listing task that always asks for a whole CPU and runs only once training
    # starts; with every CPU but a fraction held by trials (or by a finished run's worker group not yet
    # released) it never gets one and the trial hangs. The V1 reader has no such task: its reads take the
    # quarter CPU given here.
    shards = shards_dir(output_dir, stats)
    ctx = ray.data.DataContext.get_current()

    def read(split: str) -> Any:
        fs, path = storage.filesystem(storage.join(shards, split))
        v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
        chatty = logging.getLogger("ray.data._internal.datasource.parquet_datasource")  # its batch-size estimate
        level = chatty.level
        chatty.setLevel(logging.WARNING)
        try:
            return ray.data.read_parquet(path, filesystem=fs, num_cpus=_READ_CPUS)
        finally:
            ctx.use_datasource_v2 = v2
            chatty.setLevel(level)

    datasets = {"train": read("train")}
    if dataset_rows(stats, "val") > 0:
        datasets["val"] = read("val")
    return datasets, stats


def estimated_bytes(stats: dict[str, Any]) -> int:
    """The tokenized splits' size in memory: int32 ``input_ids`` and ``labels`` (and ``position_ids`` when
    packed) per token, plus a little per row."""
    columns = 3 if stats.get("packing") else 2
    rows = int(stats.get("rows_train", 0)) + int(stats.get("rows_val", 0))
    return int(stats.get("tokens_total", 0)) * 4 * columns + rows * 64


def should_cache(mode: bool | str, stats: dict[str, Any], object_store_bytes: float) -> bool:
    """``train.cache_data``: always, never, or (``auto``) when the data takes under a fifth of the store."""
    if mode != "auto":
        return bool(mode)
    return estimated_bytes(stats) <= _CACHE_SHARE * object_store_bytes


def cache_datasets(datasets: dict[str, Any], stats: dict[str, Any], mode: bool | str) -> dict[str, Any]:
    """The datasets read once into the object store (``mode``: ``train.cache_data``), or as given (streamed).

    Streaming re-reads the Parquet shards every epoch and each worker waits for the read pipeline to start
    (seconds per epoch on a small run, measured in bench/RESULTS.md); cached blocks are split to the workers
    directly. Order is kept either way, so resume is exact in both modes.
    """
    import ray

    store = ray.cluster_resources().get("object_store_memory", 0.0)
    if not should_cache(mode, stats, store):
        print(f"[train] data streamed from the shards each epoch (~{estimated_bytes(stats) / 2**20:.1f} MiB tokenized;"
              " train.cache_data=true caches it in the object store)")  # fmt: skip
        return datasets
    return {split: ds.materialize() for split, ds in datasets.items()}

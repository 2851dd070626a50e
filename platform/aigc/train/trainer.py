"""The training driver: config -> TorchTrainer -> fit -> adapter directory + registry entry.

The driver alone builds ScalingConfig, RunConfig and FailureConfig; :mod:`aigc.train.loop` only trains.
Checkpoints go to ``<output_dir>/ray/<run name>/``; re-running the same command with the same
``train.run_name`` (default: the adapter name) resumes from the last checkpoint after a crash.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from aigc import storage
from aigc.config import PlatformConfig
from aigc.data.preprocess import dataset_rows, read_stats, shards_dir
from aigc.errors import DataError, TrainingError
from aigc.publish import Published, publish, read_progress
from aigc.train.loop import NONFINITE_KEY, WorkerConfig, train_loop_per_worker

__all__ = [
    "TrainResult",
    "build_trainer",
    "estimated_bytes",
    "cache_datasets",
    "load_datasets",
    "should_cache",
    "train_loop_config",
    "plot_history",
    "run_training",
    "take_generation_samples",
]

_DONE_MARKER = "aigc_done.json"  # written into a finished run's directory
_READ_CPUS = 0.25
_CACHE_SHARE = 0.2  # cache_data=auto: cache when the data takes under this share of the object store


@dataclass
class TrainResult(Published):
    """What a training run published, and the checkpoint it came from."""

    checkpoint_path: str = ""
    run_history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def adapter_dir(self) -> str:
        """The exported weights (a PEFT adapter, or the whole model for ``train.method=full``)."""
        return self.model_dir


def train_loop_config(
    cfg: PlatformConfig,
    datasets: dict[str, Any],
    rows_train: int,
    num_workers: int,
    *,
    run_name: str,
    tokenizer: Any = None,
    gen_samples: list[Any] | None = None,
    parent_run_id: str | None = None,
    fault_at_step: int | None = None,
) -> dict[str, Any]:
    """What every worker receives: ``{"worker": WorkerConfig}``, the typed sections as objects.

    Each worker's shard holds ``rows_train // num_workers`` rows (Ray Train splits datasets into equal shards).
    The tokenizer is loaded here once (unless given) and shipped to the workers; with
    ``train.eval_generation_samples``, the first val rows become the prompts of the generation metrics (unless
    ``gen_samples`` gives them: a sweep takes them once for all its trials). ``parent_run_id``: the MLflow run
    the run is tracked under (a sweep's).
    """
    from aigc.models.loading import load_tokenizer

    tok = tokenizer or load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    rows_per_worker = rows_train // num_workers
    if rows_per_worker < 1:
        raise DataError(f"{rows_train} training rows cannot feed {num_workers} workers: use fewer train.num_workers")
    n = cfg.train.eval_generation_samples
    samples = gen_samples[:n] if gen_samples is not None else take_generation_samples(datasets, n)
    tracked = cfg.tracking.mlflow or cfg.tracking.tensorboard
    worker = WorkerConfig(
        model=cfg.model,
        lora=cfg.lora,
        train=cfg.train,
        micro_per_epoch=math.ceil(rows_per_worker / cfg.train.batch_size),
        pad_id=tok.pad_token_id,
        has_val="val" in datasets,
        tokenizer=tok,
        gen_samples=tuple(samples),
        tracking=cfg.tracking if tracked else None,
        output_dir=cfg.output_dir,
        run_name=run_name,
        params=cfg.model_dump(exclude={"serve", "tune", "cluster", "tracking"}),
        parent_run_id=parent_run_id,
        fault_at_step=fault_at_step,
    )
    return {"worker": worker}


def take_generation_samples(datasets: dict[str, Any], n: int) -> list[Any]:
    """The first ``n`` val rows as prompts and reference answers for the generation metrics (none without val)."""
    from aigc.train.gen_metrics import generation_samples

    if not n or "val" not in datasets:
        return []
    rows = datasets["val"].take(n)
    columns = {k: [r[k] for r in rows] for k in rows[0]} if rows else {"input_ids": [], "labels": []}
    return generation_samples(columns, n)


def load_datasets(cfg: PlatformConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The preprocessed train (and val) shards as Ray Datasets, and their ``stats.json``.

    The shards are those of the run stats.json names (a failed re-run of preprocessing leaves them in use).

    Raises:
        DataError: preprocessing has not run for ``output_dir``, or ran for another tokenizer.
    """
    import ray.data

    stats = read_stats(cfg.output_dir)
    data_dir = storage.join(cfg.output_dir, "data")
    # Per-epoch ingest bars of every worker's shard would drown the training metrics; Train reports progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if stats.get("tokenizer") != cfg.model.name_or_path:
        raise DataError(
            f"{data_dir} was tokenized for {stats.get('tokenizer')!r} but model.name_or_path is "
            f"{cfg.model.name_or_path!r}: re-run `aigc preprocess` with this config"
        )

    # Reading shards is I/O: a quarter CPU per read task leaves the CPUs to the Train workers, so a cluster
    # full of trials cannot starve (and deadlock) the reads that feed them. Ray 2.60's default Parquet reader
    # (datasource V2) adds a file-listing task that always asks for a whole CPU and runs only once training
    # starts; with every CPU but a fraction held by trials (or by a finished run's worker group not yet
    # released) it never gets one and the trial hangs. The V1 reader has no such task: its reads take the
    # quarter CPU given here.
    shards = shards_dir(cfg.output_dir, stats)
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


def cache_datasets(cfg: PlatformConfig, datasets: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    """The datasets read once into the object store (``train.cache_data``), or as given (streamed).

    Streaming re-reads the Parquet shards every epoch and each worker waits for the read pipeline to start
    (seconds per epoch on a small run, measured in bench/RESULTS.md); cached blocks are split to the workers
    directly. Order is kept either way, so resume is exact in both modes.
    """
    import ray

    store = ray.cluster_resources().get("object_store_memory", 0.0)
    if not should_cache(cfg.train.cache_data, stats, store):
        print(f"[train] data streamed from the shards each epoch (~{estimated_bytes(stats) / 2**20:.1f} MiB tokenized;"
              " train.cache_data=true caches it in the object store)")  # fmt: skip
        return datasets
    return {split: ds.materialize() for split, ds in datasets.items()}


def build_trainer(
    cfg: PlatformConfig,
    datasets: dict[str, Any],
    rows_train: int,
    *,
    name: str,
    storage_path: str,
    num_workers: int | None = None,
    callbacks: list[Any] | None = None,
    tokenizer: Any = None,
    gen_samples: list[Any] | None = None,
    parent_run_id: str | None = None,
    fault_at_step: int | None = None,
) -> Any:
    """A TorchTrainer for ``cfg``: DDP over ``num_workers`` (default ``train.num_workers``) workers.

    Shards are split in a deterministic order (``preserve_order``), so a resumed run sees the same batches.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    workers = num_workers or cfg.train.num_workers
    ray_storage, ray_fs = storage.filesystem_for_ray(storage_path)
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=train_loop_config(
            cfg,
            datasets,
            rows_train,
            workers,
            run_name=name,
            tokenizer=tokenizer,
            gen_samples=gen_samples,
            parent_run_id=parent_run_id,
            fault_at_step=fault_at_step,
        ),  # fmt: skip
        dataset_config=ray.train.DataConfig(execution_options=ingest),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=cfg.train.use_gpu,
            placement_strategy=cfg.train.placement_strategy,
            resources_per_worker={
                "CPU": cfg.train.cpus_per_worker,
                **({"GPU": 1} if cfg.train.use_gpu else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=ray_storage,
            storage_filesystem=ray_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute="eval_loss" if "val" in datasets else "step",
                checkpoint_score_order="min" if "val" in datasets else "max",
            ),
            callbacks=callbacks or [],
        ),
        datasets=datasets,
    )


def _run_name(cfg: PlatformConfig, storage_path: str) -> str:
    """The configured name; a run that already finished gets a fresh numbered name instead of re-running."""
    return storage.free_run_name(storage_path, cfg.train.run_name or cfg.train.adapter_name, _DONE_MARKER)


def plot_history(
    history: list[dict[str, Any]], path: str, title: str = "Fine-tuning", step_losses: list[float] | None = None
) -> None:
    """Train loss per optimizer step and eval loss at each evaluation, with the base model's eval loss dashed."""
    from matplotlib.ticker import MaxNLocator

    from aigc.plots import figure

    with figure(path, title, "optimizer step", "loss per answer token") as ax:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if step_losses:
            ax.plot(range(1, len(step_losses) + 1), step_losses, "-", lw=1, alpha=0.7, label="train loss (step)")
        else:
            ax.plot([h["step"] for h in history], [h["train_loss"] for h in history], "o-", label="train loss")
        evals = [h for h in history if "eval_loss" in h]
        if evals:
            ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "s-", label="eval loss")
            if evals[0].get("initial_eval_loss") is not None:
                ax.axhline(evals[0]["initial_eval_loss"], color="grey", ls="--", label="eval loss before training")


def run_training(cfg: PlatformConfig, register: bool = True, *, fault_at_step: int | None = None) -> TrainResult:
    """Fit on the preprocessed shards, then publish the best checkpoint (export + register).

    ``fault_at_step`` injects one worker failure after that optimizer step (resume tests; see WorkerConfig).

    Raises:
        DataError: preprocessing has not run for this output_dir, or for another tokenizer.
        TrainingError: training failed more than ``train.max_failures`` times, or its loss became NaN/inf.
    """
    import ray.train

    from aigc.models.loading import load_tokenizer

    datasets, stats = load_datasets(cfg)
    datasets = cache_datasets(cfg, datasets, stats)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    storage_path = storage.join(cfg.output_dir, "ray")
    name = _run_name(cfg, storage_path)
    rows = dataset_rows(stats, "train")
    packed = f" (packed into {rows} rows)" if stats.get("packing") else ""
    print(f"[train] run {name!r}: {stats['rows_train']} train{packed} / {stats['rows_val']} val examples, "
          f"{cfg.train.num_workers} workers, checkpoints in {storage.join(storage_path, name)}")  # fmt: skip
    try:
        trainer = build_trainer(
            cfg, datasets, rows, name=name, storage_path=storage_path, tokenizer=tokenizer, fault_at_step=fault_at_step
        )
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingError(
            f"training run {name!r} failed after {cfg.train.max_failures} restarts: {exc}. Its checkpoints are in "
            f"{storage.join(storage_path, name)}; re-run the same command to resume from the last one"
        ) from exc

    if isinstance(result.return_value, dict) and NONFINITE_KEY in result.return_value:
        step = result.return_value[NONFINITE_KEY]
        ckpt = result.checkpoint
        last = f"the last good checkpoint stays in {ckpt.path}" if ckpt else "no checkpoint had been written"
        raise TrainingError(
            f"training run {name!r} stopped: the loss became NaN or infinite at step {step}. Nothing was registered; "
            f"{last}. Lower train.lr, raise train.warmup_steps or lower train.max_grad_norm, and re-run with a new "
            "train.run_name to start afresh"
        )
    best = result.get_best_checkpoint(metric="eval_loss", mode="min") if "val" in datasets else None
    best = best or result.checkpoint
    published = publish(
        cfg,
        best,
        storage.join(cfg.output_dir, "adapter"),
        register=register,
        data_hash=stats.get("fingerprint"),
        tokenizer=tokenizer,
    )
    # The plot and history.json show the whole run: the latest checkpoint's record (the best may be earlier).
    history, step_losses = published.history, published.step_losses
    if result.checkpoint is not None and result.checkpoint.path != best.path:
        history, step_losses = read_progress(result.checkpoint)
    train_dir = storage.join(cfg.output_dir, "train")
    storage.write_json(storage.join(train_dir, "history.json"), history, indent=1)
    with storage.local_staging(train_dir) as local:
        plot = os.path.join(local, "loss.png")
        plot_history(history, plot, f"Fine-tuning {cfg.train.adapter_name}", step_losses)
        _track_artifacts(cfg, name, {plot: None, published.model_dir: "adapter"})
    done = {"adapter_dir": published.model_dir, "registry_id": published.registry_id, "metrics": published.metrics}
    storage.write_json(storage.join(storage_path, name, _DONE_MARKER), done)
    return TrainResult(
        **{**vars(published), "step_losses": step_losses}, checkpoint_path=best.path, run_history=history
    )


def _track_artifacts(cfg: PlatformConfig, run_name: str, paths: dict[str, str | None]) -> None:
    """Attach files/directories (local path -> artifact dir) to the run's MLflow record; URIs are skipped."""
    if not (cfg.tracking.mlflow or cfg.tracking.tensorboard):
        return
    from aigc.train.tracking import Tracker

    tracker = Tracker.open(cfg.tracking, cfg.output_dir, run_name, {}, resume=True)
    try:
        for path, artifact_path in paths.items():
            if os.path.exists(path):
                tracker.log_artifact(path, artifact_path)
    finally:
        tracker.close()

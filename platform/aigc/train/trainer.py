"""The training driver: config -> TorchTrainer -> fit -> adapter directory + registry entry.

The driver alone builds ScalingConfig, RunConfig and FailureConfig; :mod:`aigc.train.loop` only trains.
Checkpoints go to ``<output_dir>/ray/<run name>/``; re-running the same command with the same
``train.run_name`` (default: the adapter name) resumes from the last checkpoint after a crash, when what decides
the run is unchanged (:mod:`aigc.train.run_choice`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aigc import storage
from aigc.config import PlatformConfig
from aigc.console import StageLine
from aigc.data.preprocess import dataset_rows
from aigc.data.shard_sets import cache_datasets, load_datasets
from aigc.errors import TrainingError
from aigc.models.hub import resolve_model
from aigc.models.loading import load_tokenizer
from aigc.train.context import RayTrainContext
from aigc.train.init_adapter import resolve_init_adapter
from aigc.train.loop import NONFINITE_KEY, train_loop_per_worker
from aigc.train.outputs import write_outputs
from aigc.train.progress import StepFeed
from aigc.train.publish import Published, publish, read_progress
from aigc.train.run_choice import DONE_MARKER, choose_run, record_run, run_inputs
from aigc.train.worker_config import build_worker_config

__all__ = ["TrainResult", "build_trainer", "run_training"]


@dataclass
class TrainResult(Published):
    """What a training run published, and the checkpoint it came from."""

    checkpoint_path: str = ""
    run_history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def adapter_dir(self) -> str:
        """The exported weights (a PEFT adapter, or the whole model for ``train.method=full``)."""
        return self.model_dir


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
    progress: Any = None,
) -> Any:
    """A TorchTrainer for ``cfg``: DDP over ``num_workers`` (default ``train.num_workers``) workers.

    Shards are split in a deterministic order (``preserve_order``), so a resumed run sees the same batches.
    ``tokenizer``, ``gen_samples``, ``parent_run_id``: as :func:`aigc.train.worker_config.build_worker_config`.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    workers = num_workers or cfg.train.num_workers
    ray_storage, ray_fs = storage.filesystem_for_ray(storage_path)
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    worker = build_worker_config(
        cfg, datasets, rows_train, workers, run_name=name, tokenizer=tokenizer, gen_samples=gen_samples,
        parent_run_id=parent_run_id, progress=progress,
    )  # fmt: skip
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"worker": worker, "context": RayTrainContext()},
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


def run_training(cfg: PlatformConfig, register: bool = True) -> TrainResult:
    """Fit on the preprocessed shards, then publish the best checkpoint (export + register).

    The base model is resolved here when the caller has not (:func:`aigc.models.hub.resolve_model`): the
    workers load its snapshot, and the registry records its commit.

    Raises:
        DataError: preprocessing has not run for this output_dir, or for another tokenizer.
        ModelUnavailableError: the base model cannot be had.
        TrainingError: training failed more than ``train.max_failures`` times, or its loss became NaN/inf.
    """
    import ray.train

    cfg = cfg.model_copy(update={"model": resolve_model(cfg.model, weights=True)})
    cfg = resolve_init_adapter(cfg)
    datasets, stats = load_datasets(cfg.output_dir, cfg.model)
    datasets = cache_datasets(datasets, stats, cfg.train.cache_data)
    tokenizer = load_tokenizer(cfg.model.load_path(), cfg.model.trust_remote_code)
    storage_path = storage.join(cfg.output_dir, "ray")
    inputs = run_inputs(cfg, stats)
    choice = choose_run(storage_path, cfg.train.run_name or cfg.train.adapter_name, inputs, cfg.train.resume)
    record_run(storage_path, choice)
    name = choice.name
    rows = dataset_rows(stats, "train")
    packed = f" (packed into {rows} rows)" if stats.get("packing") else ""
    print(f"[train] {choice.message}: {stats['rows_train']} train{packed} / {stats['rows_val']} val examples, "
          f"{cfg.train.num_workers} workers, checkpoints in {storage.join(storage_path, name)}")  # fmt: skip
    try:
        # Rank 0 sends its step lines to this driver, which draws them as one live line (aigc.console).
        with StageLine("train") as line, StepFeed(line) as feed:
            trainer = build_trainer(
                cfg, datasets, rows, name=name, storage_path=storage_path, tokenizer=tokenizer, progress=feed.sink
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
    title = f"Fine-tuning {cfg.train.adapter_name}"
    write_outputs(cfg.output_dir, cfg.tracking, name, title, history, step_losses, published.model_dir)
    done = {"adapter_dir": published.model_dir, "registry_id": published.registry_id, "metrics": published.metrics}
    storage.write_json(storage.join(storage_path, name, DONE_MARKER), done)
    return TrainResult(
        **{**vars(published), "step_losses": step_losses}, checkpoint_path=best.path, run_history=history
    )

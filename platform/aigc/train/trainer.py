"""The training driver: config -> TorchTrainer -> fit -> adapter directory + registry entry.

The driver alone builds ScalingConfig, RunConfig and FailureConfig; :mod:`aigc.train.loop` only trains.
Checkpoints go to ``<output_dir>/ray/<run name>/``; re-running the same command with the same
``train.run_name`` (default: the adapter name) resumes from the last checkpoint after a crash.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import Any

from aigc.config import PlatformConfig
from aigc.data.preprocess import DataError, read_stats
from aigc.train.loop import ADAPTER_SUBDIR, HISTORY_FILE, train_loop_per_worker

__all__ = [
    "TrainResult",
    "build_trainer",
    "load_datasets",
    "train_loop_config",
    "run_training",
    "export_adapter",
]

_DONE_MARKER = "aigc_done.json"
_READ_CPUS = 0.25


@dataclass
class TrainResult:
    adapter_dir: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    registry_id: str | None
    checkpoint_path: str


def train_loop_config(cfg: PlatformConfig, rows_train: int, has_val: bool, num_workers: int) -> dict[str, Any]:
    """The plain dict every worker receives; ``steps_per_epoch`` makes the LR schedule resume-exact."""
    from aigc.models.loading import load_tokenizer, resolve_local_path

    tok = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    rows_per_worker = max(1, rows_train // num_workers)
    micro_batches = math.ceil(rows_per_worker / cfg.train.batch_size)
    return {
        "model_name_or_path": resolve_local_path(cfg.model.name_or_path, relative_in_working_dir=False),
        "dtype": cfg.model.dtype,
        "trust_remote_code": cfg.model.trust_remote_code,
        "method": cfg.train.method,
        "lora_r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout,
        "lora_target_modules": cfg.lora.target_modules,
        "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "lr": cfg.train.lr,
        "weight_decay": cfg.train.weight_decay,
        "warmup_ratio": cfg.train.warmup_ratio,
        "max_grad_norm": cfg.train.max_grad_norm,
        "seed": cfg.train.seed,
        "steps_per_epoch": max(1, micro_batches // cfg.train.grad_accum),
        "pad_id": tok.pad_token_id,
        "has_val": has_val,
    }


def load_datasets(cfg: PlatformConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    import ray.data

    from aigc.models.loading import resolve_local_path

    stats = read_stats(cfg.output_dir)
    data_dir = os.path.join(cfg.output_dir, "data")
    # Per-epoch ingest bars of every worker's shard would drown the training metrics; Train reports progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if stats.get("tokenizer") != resolve_local_path(cfg.model.name_or_path, relative_in_working_dir=False):
        raise DataError(
            f"{data_dir} was tokenized for {stats.get('tokenizer')!r} but model.name_or_path is "
            f"{cfg.model.name_or_path!r}: re-run `aigc preprocess` with this config"
        )
    # Reading shards is I/O: a quarter CPU per read task leaves the CPUs to the Train workers, so a cluster
    # full of trials cannot starve (and deadlock) the reads that feed them.
    datasets = {"train": ray.data.read_parquet(os.path.join(data_dir, "train"), num_cpus=_READ_CPUS)}
    if stats["rows_val"] > 0:
        datasets["val"] = ray.data.read_parquet(os.path.join(data_dir, "val"), num_cpus=_READ_CPUS)
    return datasets, stats


def build_trainer(
    cfg: PlatformConfig,
    datasets: dict[str, Any],
    rows_train: int,
    *,
    name: str,
    storage_path: str,
    num_workers: int | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """A TorchTrainer for ``cfg``: DDP over ``num_workers`` (default ``train.num_workers``) workers."""
    import ray.train
    from ray.train.torch import TorchTrainer

    workers = num_workers or cfg.train.num_workers
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=train_loop_config(cfg, rows_train, "val" in datasets, workers),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={
                "CPU": cfg.train.cpus_per_worker,
                **({"GPU": 1} if cfg.train.use_gpu else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep,
                checkpoint_score_attribute="eval_loss" if "val" in datasets else "epoch",
                checkpoint_score_order="min" if "val" in datasets else "max",
            ),
            callbacks=callbacks or [],
        ),
        datasets=datasets,
    )


def _storage(cfg: PlatformConfig) -> str:
    return os.path.abspath(os.path.join(cfg.output_dir, "ray"))


def _run_name(cfg: PlatformConfig, storage: str) -> str:
    """The configured name; a run that already finished gets a fresh numbered name instead of re-running."""
    base = cfg.train.run_name or cfg.train.adapter_name
    name, n = base, 1
    while os.path.isfile(os.path.join(storage, name, _DONE_MARKER)):
        n += 1
        name = f"{base}-{n}"
    return name


def export_adapter(checkpoint_path: str, dest: str, cfg: PlatformConfig) -> list[dict[str, Any]]:
    """Copy a checkpoint's adapter to ``dest`` (a plain PEFT dir + tokenizer); return its metric history."""
    from aigc.models.loading import load_tokenizer

    if os.path.isdir(dest):
        shutil.rmtree(dest)
    shutil.copytree(os.path.join(checkpoint_path, ADAPTER_SUBDIR), dest)
    load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code).save_pretrained(dest)
    with open(os.path.join(checkpoint_path, HISTORY_FILE)) as f:
        return json.load(f)


def plot_history(history: list[dict[str, Any]], path: str, title: str = "Fine-tuning") -> None:
    """Train and eval loss per epoch, with the base model's eval loss as a dashed line."""
    from matplotlib.ticker import MaxNLocator

    from aigc.plots import figure

    epochs = [h["epoch"] for h in history]
    with figure(path, title, "epoch", "loss per answer token") as ax:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
        if history and "eval_loss" in history[0]:
            ax.plot(epochs, [h["eval_loss"] for h in history], "s-", label="eval loss")
            if history[0].get("initial_eval_loss") is not None:
                ax.axhline(history[0]["initial_eval_loss"], color="grey", ls="--", label="eval loss before training")


def run_training(cfg: PlatformConfig, register: bool = True) -> TrainResult:
    """Fit on the preprocessed shards, export the best checkpoint's adapter and register it.

    Raises:
        DataError: preprocessing has not run for this output_dir, or for another tokenizer.
        ray.train.TrainingFailedError: training failed more than ``train.max_failures`` times.
    """
    from aigc.models.loading import resolve_local_path
    from aigc.registry import Registry

    datasets, stats = load_datasets(cfg)
    storage = _storage(cfg)
    name = _run_name(cfg, storage)
    print(f"[train] run {name!r}: {stats['rows_train']} train / {stats['rows_val']} val rows, "
          f"{cfg.train.num_workers} workers, checkpoints in {os.path.join(storage, name)}")  # fmt: skip
    result = build_trainer(cfg, datasets, stats["rows_train"], name=name, storage_path=storage).fit()

    best = result.get_best_checkpoint(metric="eval_loss", mode="min") if "val" in datasets else None
    best = best or result.checkpoint
    adapter_dir = os.path.join(cfg.output_dir, "adapter")
    history = export_adapter(best.path, adapter_dir, cfg)
    best_epoch = min(history, key=lambda h: h.get("eval_loss", -h["epoch"]))
    metrics = {k: v for k, v in best_epoch.items() if isinstance(v, int | float)}
    train_dir = os.path.join(cfg.output_dir, "train")
    os.makedirs(train_dir, exist_ok=True)
    with open(os.path.join(train_dir, "history.json"), "w") as f:
        json.dump(history, f, indent=1)
    plot_history(history, os.path.join(train_dir, "loss.png"), f"Fine-tuning {cfg.train.adapter_name}")

    registry_id = None
    if register:
        entry = Registry(cfg.registry_dir).register(
            cfg.train.adapter_name,
            adapter_dir,
            base_model=resolve_local_path(cfg.model.name_or_path, relative_in_working_dir=False),
            metrics=metrics,
            config=cfg.model_dump(),
            data_hash=stats.get("fingerprint"),
        )
        registry_id = entry.model_id
    with open(os.path.join(storage, name, _DONE_MARKER), "w") as f:
        json.dump({"adapter_dir": adapter_dir, "registry_id": registry_id, "metrics": metrics}, f)
    return TrainResult(adapter_dir, metrics, history, registry_id, best.path)

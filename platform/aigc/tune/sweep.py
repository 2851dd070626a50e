"""Hyperparameter sweeps: Ray Tune runs one driver function per trial, each fitting a TorchTrainer.

ASHA stops weak trials after ``tune.grace_period`` epochs; the best trial's adapter (by ``tune.metric``
at its last epoch) is exported to ``<output_dir>/sweep/best_adapter`` and registered.
Outputs: ``sweep/trials.csv`` (one row per trial) and ``sweep/trials.png`` (eval loss per epoch, every trial).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from aigc import storage
from aigc.config import PlatformConfig, with_values
from aigc.errors import TrainingError
from aigc.publish import publish
from aigc.tune.space import load_space, to_param_space

__all__ = ["SweepResult", "build_tuner", "run_sweep"]

# The trial's own process only waits on its TorchTrainer; the Train workers hold the real CPUs/GPUs.
_DRIVER_CPUS = 0.25


@dataclass
class SweepResult:
    best_overrides: dict[str, Any]
    best_metrics: dict[str, Any]
    adapter_dir: str
    registry_id: str | None
    trials: Any  # pandas.DataFrame


def _trial_driver(config: dict[str, Any], base: PlatformConfig) -> None:
    """One trial: the base config with this trial's sampled values set by key path, trained with Ray Train."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from aigc.data.preprocess import dataset_rows
    from aigc.train.trainer import build_trainer, load_datasets

    cfg = with_values(base, config)
    datasets, stats = load_datasets(cfg)
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = build_trainer(
        cfg,
        datasets,
        dataset_rows(stats, "train"),
        name=f"trial_id={trial_id}",
        storage_path=storage.join(cfg.output_dir, "sweep", "trials"),
        num_workers=cfg.tune.num_workers_per_trial,
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def default_concurrency(cfg: PlatformConfig, cluster_cpus: float) -> int:
    """Trials that fit at once while one CPU stays free for the Ray Data tasks feeding them."""
    per_trial = _DRIVER_CPUS + cfg.tune.num_workers_per_trial * cfg.train.cpus_per_worker
    return max(1, int((cluster_cpus - 1) // per_trial))


def build_tuner(cfg: PlatformConfig) -> Any:
    """A Tuner over ``tune.space`` with ASHA on ``tune.metric``; validates the space first."""
    import ray
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    from aigc.tune.progress import SweepProgress

    space = load_space(cfg.tune.space, cfg)
    # The trial receives the config as an object (its paths were made absolute when it was loaded).
    trainable = ray.tune.with_resources(ray.tune.with_parameters(_trial_driver, base=cfg), {"cpu": _DRIVER_CPUS})
    sweep_storage, sweep_fs = storage.filesystem_for_ray(storage.join(cfg.output_dir, "sweep"))
    return ray.tune.Tuner(
        trainable,
        param_space=to_param_space(space),
        tune_config=ray.tune.TuneConfig(
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=cfg.tune.max_concurrent_trials
            or default_concurrency(cfg, ray.cluster_resources().get("CPU", 1)),
            scheduler=ASHAScheduler(
                metric=cfg.tune.metric,
                mode=cfg.tune.mode,
                time_attr="training_iteration",
                max_t=cfg.train.epochs,
                grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
                reduction_factor=cfg.tune.reduction_factor,
            ),
        ),
        run_config=ray.tune.RunConfig(
            name=cfg.tune.name,
            storage_path=sweep_storage,
            storage_filesystem=sweep_fs,
            verbose=0,  # one line per trial event instead of Tune's tables
            callbacks=[SweepProgress(cfg.tune.metric, cfg.tune.num_samples)],
        ),
    )


def _plot_trials(results: Any, metric: str, path: str) -> None:
    from matplotlib.ticker import MaxNLocator

    from aigc.plots import figure

    title = "Sweep: every trial (ASHA stops the weak ones early)"
    with figure(path, title, "epoch", metric, size=(6.5, 4)) as ax:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for r in results:
            df = r.metrics_dataframe
            if df is None or metric not in df:
                continue
            label = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.config.items())
            ax.plot(df["epoch"], df[metric], "o-", label=label)


def _trials_table(results: Any, best: Any, epochs: int) -> Any:
    import pandas as pd

    rows = []
    for r in results:
        m = r.metrics or {}
        rows.append({
            **dict(r.config),
            "epochs": m.get("epoch"),
            "train_loss": m.get("train_loss"),
            "eval_loss": m.get("eval_loss"),
            "eval_perplexity": m.get("eval_perplexity"),
            "status": "error" if r.error else ("stopped early" if m.get("epoch", 0) < epochs else "done"),
            "best": r.path == best.path,
        })  # fmt: skip
    return pd.DataFrame(rows).sort_values("eval_loss", na_position="last").reset_index(drop=True)


def _best_checkpoint(best: Any, cfg: PlatformConfig) -> Any:
    """The best trial's checkpoint as a ``ray.train.Checkpoint`` on the sweep's storage filesystem."""
    import ray.train

    path = best.metrics["checkpoint_path"]
    if storage.is_uri(path):
        fs, inner = storage.filesystem(path)
        return ray.train.Checkpoint(inner, filesystem=fs)
    _, fs = storage.filesystem_for_ray(storage.join(cfg.output_dir, "sweep"))
    return ray.train.Checkpoint(path, filesystem=fs)


def run_sweep(cfg: PlatformConfig, register: bool = True) -> SweepResult:
    """Run the sweep, write the trials table and plot, then publish the best trial (export + register).

    Raises:
        ConfigError: the search space is missing or invalid (before any trial starts).
        TrainingError: no trial reported ``tune.metric`` with a checkpoint.
    """
    from aigc.data.preprocess import read_stats

    stats = read_stats(cfg.output_dir)  # fail before Tune starts if preprocessing has not run
    results = build_tuner(cfg).fit()
    best = results.get_best_result(metric=cfg.tune.metric, mode=cfg.tune.mode, scope="last")
    if best is None or best.metrics is None or "checkpoint_path" not in best.metrics:
        errors = [str(r.error).splitlines()[0] for r in results if r.error]
        raise TrainingError(
            f"no sweep trial reported {cfg.tune.metric!r} with a checkpoint; first errors: {errors[:3]}. "
            f"Trial logs are under {storage.join(cfg.output_dir, 'sweep', cfg.tune.name)}"
        )

    trials = _trials_table(results, best, cfg.train.epochs)
    sweep_dir = storage.join(cfg.output_dir, "sweep")
    storage.write_text(storage.join(sweep_dir, "trials.csv"), trials.to_csv(index=False))
    with storage.local_staging(sweep_dir) as local:
        _plot_trials(results, cfg.tune.metric, os.path.join(local, "trials.png"))
    print("\n[sweep] trials (best first):\n" + trials.to_string(float_format=lambda x: f"{x:.4g}"))

    overrides = dict(best.config)
    published = publish(
        with_values(cfg, overrides),
        _best_checkpoint(best, cfg),
        storage.join(sweep_dir, "best_adapter"),
        register=register,
        extra_config={"sweep_overrides": overrides},
        data_hash=stats.get("fingerprint"),
    )
    return SweepResult(overrides, published.metrics, published.model_dir, published.registry_id, trials)

"""Hyperparameter sweeps: Ray Tune runs one driver function per trial, each fitting a TorchTrainer.

ASHA stops weak trials after ``tune.grace_period`` epochs; the best trial's adapter (by ``tune.metric``
at its last epoch) is exported to ``<output_dir>/sweep/best_adapter`` and registered.
Outputs: ``sweep/trials.csv`` (one row per trial) and ``sweep/trials.png`` (eval loss per epoch, every trial).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from aigc.config import PlatformConfig, with_values
from aigc.models.loading import resolve_local_path
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


def _trial_driver(config: dict[str, Any], base: dict[str, Any]) -> None:
    """One trial: the base config plus this trial's sampled values, trained with Ray Train."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from aigc.train.trainer import build_trainer, load_datasets

    cfg = with_values(base, config)
    datasets, stats = load_datasets(cfg)
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = build_trainer(
        cfg,
        datasets,
        stats["rows_train"],
        name=f"trial_id={trial_id}",
        storage_path=os.path.abspath(os.path.join(cfg.output_dir, "sweep", "trials")),
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

    space = load_space(cfg.tune.space, cfg)
    # Trials run in their own directories: hand them absolute local paths.
    base = cfg.model_dump()
    base["model"]["name_or_path"] = resolve_local_path(cfg.model.name_or_path, relative_in_working_dir=False)
    for key in ("output_dir", "registry_dir"):
        base[key] = resolve_local_path(base[key], is_local="://" not in base[key], relative_in_working_dir=False)
    trainable = ray.tune.with_resources(ray.tune.with_parameters(_trial_driver, base=base), {"cpu": _DRIVER_CPUS})
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
            storage_path=os.path.abspath(os.path.join(cfg.output_dir, "sweep")),
            verbose=1,
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


def run_sweep(cfg: PlatformConfig, register: bool = True) -> SweepResult:
    """Run the sweep, print the trials table, export and register the best trial's adapter.

    Raises:
        ConfigError: the search space is missing or invalid (before any trial starts).
        RuntimeError: no trial reported ``tune.metric``.
    """
    import pandas as pd

    from aigc.data.preprocess import read_stats
    from aigc.registry import Registry
    from aigc.train.trainer import export_adapter

    stats = read_stats(cfg.output_dir)  # fail before Tune starts if preprocessing has not run
    results = build_tuner(cfg).fit()
    best = results.get_best_result(metric=cfg.tune.metric, mode=cfg.tune.mode, scope="last")
    if best is None or best.metrics is None or "checkpoint_path" not in best.metrics:
        errors = [str(r.error) for r in results if r.error]
        raise RuntimeError(f"no trial reported {cfg.tune.metric!r} with a checkpoint; errors: {errors[:3]}")

    rows = []
    for r in results:
        m = r.metrics or {}
        rows.append({
            **{k: v for k, v in r.config.items()},
            "epochs": m.get("epoch"),
            "train_loss": m.get("train_loss"),
            "eval_loss": m.get("eval_loss"),
            "eval_perplexity": m.get("eval_perplexity"),
            "status": "error" if r.error else ("stopped early" if m.get("epoch", 0) < cfg.train.epochs else "done"),
            "best": r.path == best.path,
        })  # fmt: skip
    trials = pd.DataFrame(rows).sort_values("eval_loss", na_position="last").reset_index(drop=True)
    sweep_dir = os.path.join(cfg.output_dir, "sweep")
    trials.to_csv(os.path.join(sweep_dir, "trials.csv"), index=False)
    _plot_trials(results, cfg.tune.metric, os.path.join(sweep_dir, "trials.png"))
    print("\n[sweep] trials (best first):\n" + trials.to_string(float_format=lambda x: f"{x:.4g}"))

    adapter_dir = os.path.join(sweep_dir, "best_adapter")
    history = export_adapter(best.metrics["checkpoint_path"], adapter_dir, cfg)
    overrides = dict(best.config)
    metrics = {k: v for k, v in history[-1].items() if isinstance(v, int | float)}
    registry_id = None
    if register:
        best_cfg = with_values(cfg, overrides)
        registry_id = (
            Registry(cfg.registry_dir)
            .register(
                cfg.train.adapter_name,
                adapter_dir,
                base_model=resolve_local_path(cfg.model.name_or_path, relative_in_working_dir=False),
                metrics=metrics,
                config={**best_cfg.model_dump(), "sweep_overrides": overrides},
                data_hash=stats.get("fingerprint"),
            )
            .model_id
        )
    return SweepResult(overrides, metrics, adapter_dir, registry_id, trials)

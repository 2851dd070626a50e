"""A sweep's MLflow run, the parent of its trials' runs (with ``tracking.mlflow``).

The parent run is named ``sweep=<sweep name>`` and lives in the same experiment as the trials (``tracking.
experiment``, else ``train.adapter_name``). It logs the sweep's base config and its search space
(``space.<key>`` params) when it starts; every trial's training run is created with MLflow's
``mlflow.parentRunId`` tag pointing at it, so the MLflow UI shows the trials nested under the sweep. When the
sweep finishes, the parent gets the best trial (``best.trial_id`` and ``best.<key>`` tags), the best metric
(``best_<tune.metric>``) and the trials table, the plots and the best config as artifacts. Re-running an
interrupted sweep continues the same parent run.
"""

from __future__ import annotations

from typing import Any

from aigc.config import PlatformConfig
from aigc.train.tracking import Tracker
from aigc.tune.space import Space

__all__ = ["finish_sweep_run", "open_sweep_run"]


def _describe(space: Space) -> dict[str, str]:
    """``{"train.lr": "loguniform [0.001, 0.008]", "lora.alpha": "lora.r x choice [1, 2]"}``."""
    return {p.key: (f"{p.of} x " if p.of else "") + f"{p.dist} {list(p.args)}" for p in space.params}


def open_sweep_run(cfg: PlatformConfig, name: str, space: Space) -> Tracker:
    """Start (or continue) the sweep's parent run; a disabled tracker without ``tracking.mlflow``."""
    if not cfg.tracking.mlflow:
        return Tracker.disabled()
    params = {**cfg.model_dump(exclude={"serve", "cluster", "tracking"}), "space": _describe(space)}
    mlflow_only = cfg.tracking.model_copy(update={"tensorboard": False})  # the trials write the curves
    return Tracker.open(mlflow_only, cfg.output_dir, f"sweep={name}", params, resume=True)


def finish_sweep_run(tracker: Tracker, metric: str, best: dict[str, Any], files: list[str]) -> None:
    """Log the best trial and metric and attach ``files`` (local paths), then end the run.

    Args:
        best: ``{"trial_id": ..., "values": {key: value}, "metrics": {name: value}}``.
    """
    tags = {"best.trial_id": best.get("trial_id"), **{f"best.{k}": v for k, v in best["values"].items()}}
    tracker.set_tags(tags)
    value = best["metrics"].get(metric)
    if value is not None:
        tracker.log_metrics({f"best_{metric}": value}, step=0)
    for path in files:
        tracker.log_artifact(path)
    tracker.close()

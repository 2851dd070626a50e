"""What a finished training run leaves beside its adapter: ``train/history.json``, ``train/loss.png``, and the
plot and the adapter attached to the run's MLflow record (with ``tracking.mlflow``)."""

from __future__ import annotations

import os
from typing import Any

from aigc import storage
from aigc.config import TrackingConfig
from aigc.plots import figure
from aigc.train.tracking import Tracker

__all__ = ["plot_history", "plot_rewards", "track_artifacts", "write_outputs"]


def plot_history(
    history: list[dict[str, Any]], path: str, title: str = "Fine-tuning", step_losses: list[float] | None = None
) -> None:
    """Train loss per optimizer step and eval loss at each evaluation, with the base model's eval loss dashed."""
    from matplotlib.ticker import MaxNLocator

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


def plot_rewards(history: list[dict[str, Any]], path: str, title: str = "Preference tuning") -> bool:
    """A preference run's held-out pairs at each evaluation: reward accuracy (left axis) and reward margin (right).
    Returns False (nothing drawn) for a run without those metrics."""
    evals = [h for h in history if "eval_reward_accuracy" in h]
    if not evals:
        return False
    steps = [h["step"] for h in evals]
    with figure(path, title, "optimizer step", "reward accuracy (held-out pairs)") as ax:
        ax.plot(steps, [h["eval_reward_accuracy"] for h in evals], "o-", color="#4477aa", label="reward accuracy")
        ax.axhline(0.5, color="grey", ls="--", label="chance")
        ax.set_ylim(0, 1.05)
        margin = ax.twinx()
        margin.plot(steps, [h["eval_reward_margin"] for h in evals], "s-", color="#cc3311", label="reward margin")
        margin.set_ylabel("reward margin (chosen - rejected)")
    return True


def track_artifacts(tracking: TrackingConfig, output_dir: str, run_name: str, paths: dict[str, str | None]) -> None:
    """Attach files/directories (local path -> artifact dir) to the run's MLflow record; missing paths are
    skipped. Nothing without tracking."""
    if not (tracking.mlflow or tracking.tensorboard):
        return
    tracker = Tracker.open(tracking, output_dir, run_name, {}, resume=True)
    try:
        for path, artifact_path in paths.items():
            if os.path.exists(path):
                tracker.log_artifact(path, artifact_path)
    finally:
        tracker.close()


def write_outputs(
    output_dir: str,
    tracking: TrackingConfig,
    run_name: str,
    title: str,
    history: list[dict[str, Any]],
    step_losses: list[float],
    model_dir: str,
) -> None:
    """Write ``<output_dir>/train/history.json``, ``loss.png`` (and ``rewards.png`` for DPO/ORPO); attach the
    plots and ``model_dir`` (the exported adapter) to the run's MLflow record."""
    train_dir = storage.join(output_dir, "train")
    storage.write_json(storage.join(train_dir, "history.json"), history, indent=1)
    with storage.local_staging(train_dir) as local:
        plot = os.path.join(local, "loss.png")
        plot_history(history, plot, title, step_losses)
        rewards = os.path.join(local, "rewards.png")
        drawn = plot_rewards(history, rewards, title)
        track_artifacts(
            tracking, output_dir, run_name, {plot: None, model_dir: "adapter", **({rewards: None} if drawn else {})}
        )

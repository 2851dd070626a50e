"""What a finished sweep leaves for people: the trials table and CSV, two plots, the best config as YAML.

- ``trials.csv``: one row per trial, best first: its values, reports, last metrics, status, time.
- ``curves.png``: each trial's learning curve (``tune.metric`` at every evaluation, by optimizer step, from
  the base model's eval loss at step 0); a curve that ends early is a trial the scheduler stopped.
- ``params.png``: each searched key against the trial's final metric (one panel per key); a trend across a
  panel shows the key matters, a flat cloud that it does not (in this range).
- ``best_config.yaml``: the whole config with the best trial's values; ``aigc train --config`` reproduces it.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from aigc.config import PlatformConfig, with_values
from aigc.tune.space import Space, resolve

__all__ = ["best_config", "best_config_yaml", "plot_curves", "plot_params", "trials_table", "values_label"]


# Shown in the table when the trials report them (train.eval_generation_samples > 0): answers scored, not loss.
_GENERATION_METRICS = ("eval_exact_match", "eval_rouge_l")


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def values_label(values: dict[str, Any]) -> str:
    """A trial's values in short: ``lr=0.00669, r=16`` (last part of each key, floats to 3 digits)."""
    return ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in values.items())


def trials_table(results: list[Any], space: Space, cfg: PlatformConfig, best_path: str | None) -> Any:
    """One row per trial (``results``: Tune ``Result`` objects), best ``tune.metric`` first.

    Status: ``done`` (every epoch), ``stopped early`` (by the scheduler or the loop's early stopping), ``error``.
    """
    import pandas as pd

    metric = cfg.tune.metric
    rows = []
    for r in results:
        m, values = r.metrics or {}, resolve(space, r.config or {})
        epochs = values.get("train.epochs", cfg.train.epochs)
        stopped = (m.get("epoch") or 0) < epochs
        rows.append({
            "trial": m.get("trial_id", "?"),
            **values,
            "reports": m.get("training_iteration"),
            "epoch": m.get("epoch"),
            "step": m.get("step"),
            "train_loss": m.get("train_loss"),
            "eval_loss": m.get("eval_loss"),
            **{k: m.get(k) for k in _GENERATION_METRICS},
            metric: m.get(metric),
            "status": "error" if r.error else ("stopped early" if stopped else "done"),
            "time_s": round(m.get("time_total_s") or float("nan"), 1),
            "best": r.path == best_path,
        })  # fmt: skip
    df = pd.DataFrame(rows)
    df = df.drop(columns=[k for k in _GENERATION_METRICS if k != metric and df[k].isna().all()])
    return df.sort_values(metric, ascending=cfg.tune.mode == "min", na_position="last").reset_index(drop=True)


def plot_curves(results: list[Any], space: Space, metric: str, path: str) -> None:
    """Each trial's ``metric`` at every evaluation against the optimizer step."""
    from matplotlib.ticker import MaxNLocator

    from aigc.plots import figure

    with figure(path, "Sweep: learning curve of every trial", "optimizer step", metric, size=(7, 4)) as ax:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        seen: list[float] = []
        for r in results:
            df = r.metrics_dataframe
            if df is None or metric not in df or "step" not in df:
                continue
            steps, values = list(df["step"]), list(df[metric])
            if metric == "eval_loss" and "initial_eval_loss" in df:  # every curve starts at the base model's loss
                steps, values = [0, *steps], [df["initial_eval_loss"].iloc[0], *values]
            ax.plot(steps, values, "o-", ms=3, label=values_label(resolve(space, r.config or {})))
            seen += values
        _log_if_wide(ax, seen)


def _log_if_wide(ax: Any, values: list[Any]) -> None:
    """A log y axis when the values are positive and span more than 20x (a loss from the base model's ~5 down
    to ~0.001): on a linear axis the good trials would lie on top of each other."""
    ok = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if ok and min(ok) > 0 and max(ok) / min(ok) > 20:
        ax.set_yscale("log")


def plot_params(table: Any, space: Space, metric: str, path: str) -> None:
    """One panel per searched key: the key's value (x) against the trial's final ``metric`` (y); best starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = space.keys
    cols = min(len(keys), 3)
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(3.2 * cols, 5.0), 2.8 * rows + 0.4), squeeze=False)
    try:
        for ax, key in zip(axes.flat, keys, strict=False):
            ok = table[table[metric].notna()]
            ax.scatter(ok[key], ok[metric], s=18)
            _log_if_wide(ax, list(ok[metric]))
            best = ok[ok["best"]]
            ax.scatter(best[key], best[metric], marker="*", s=140, color="tab:red", label="best")
            if any(p.key == key and p.dist == "loguniform" for p in space.params):
                ax.set_xscale("log")
            ax.set_xlabel(key)
            ax.set_ylabel(f"final {metric}")
        for ax in list(axes.flat)[len(keys) :]:
            ax.set_visible(False)
        fig.suptitle("Sweep: final metric per searched key (red star = best trial)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def best_config(cfg: PlatformConfig, values: dict[str, Any]) -> PlatformConfig:
    """The sweep's config with the best trial's values, trained the way the trial was (its worker count)."""
    return with_values(cfg, {**values, "train.num_workers": cfg.tune.num_workers_per_trial})


def best_config_yaml(best: PlatformConfig, sweep_id: str, values: dict[str, Any]) -> str:
    """A ready-to-run config file for ``aigc train --config``: a header naming the sweep, then every key."""
    chosen = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
    header = (
        f"# The best trial of sweep {sweep_id}: {chosen}\n"
        "#   aigc train --config <this file>      # trains the best trial's configuration again\n"
    )
    return header + yaml.safe_dump(best.model_dump(mode="json"), sort_keys=False)

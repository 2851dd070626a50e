"""How a sweep searches and stops: ``tune.search`` (random, grid, optuna) and ``tune.scheduler`` (asha, median,
pbt, none), and the checks that make a bad sweep fail before any trial starts.

ASHA's and the median rule's time unit is one report of the training loop (an evaluation: each
``train.eval_every_steps`` and every epoch end), so ``tune.grace_period: 2`` means "two evaluations before a
trial may be stopped".

Population-based training (``tune.scheduler: pbt``, Ray Tune's ``PopulationBasedTraining``): every
``tune.perturbation_interval`` epochs (or optimizer steps, ``tune.perturbation_unit: step``) at a checkpoint,
a trial in the bottom quarter by ``tune.metric`` stops, takes the config of a top-quarter trial with each
searched key perturbed (x0.8 or x1.2, a neighbouring value of a choice, or resampled), and continues from that
trial's latest checkpoint. The loop loads the donor's weights, optimizer moments and schedule position, then
applies the trial's own (perturbed) ``train.lr`` and ``weight_decay`` (:func:`aigc.train.checkpointing.
load_checkpoint`). Only keys that can change mid-run may be searched (:data:`PBT_MUTABLE`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from aigc.config import PlatformConfig, with_values
from aigc.errors import ConfigError
from aigc.tune.space import Space, load_space, to_param_space

__all__ = [
    "PBT_MUTABLE",
    "PREFERENCE_METRICS",
    "REPORTED_METRICS",
    "build_scheduler",
    "build_search",
    "check_sweep",
    "max_reports",
    "trial_base",
    "trial_count",
]

# Every metric the training loop reports at each evaluation (aigc.train.loop); tune.metric must be one of these.
# A run with validation data reports the eval_* keys; a run without reports the train_* ones only.
REPORTED_METRICS = (
    "eval_loss",
    "eval_perplexity",
    "eval_tokens",
    "eval_exact_match",  # with train.eval_generation_samples > 0
    "eval_rouge_l",
    "train_loss",
    "train_tokens_per_s",
    "train_time_s",
    "initial_eval_loss",
    "epoch",
    "step",
    "lr",
)

# What a preference run (train.preference.method) reports instead of eval_perplexity and eval_tokens
# (aigc.train.preference): tune.metric may name these with mode "max" (accuracy, margin) for DPO/ORPO sweeps.
PREFERENCE_METRICS = ("eval_reward_accuracy", "eval_reward_margin", "eval_rewards_chosen", "eval_rewards_rejected",
                      "eval_logps_chosen", "eval_logps_rejected", "eval_pairs")  # fmt: skip

# Keys a running trial can take a new value of when it continues another trial's checkpoint (PBT): the loop
# re-applies lr and weight decay after loading the optimizer, reads max_grad_norm every step, and builds the
# model (dropout) from the config before loading the weights. Shapes (lora.r, method, target modules), the
# data's order and length (batch size, epochs) and the schedule's shape cannot change under a checkpoint.
PBT_MUTABLE = ("train.lr", "train.weight_decay", "train.max_grad_norm", "lora.dropout")

# Keys that change how many reports a trial makes (see max_reports).
_LENGTH_KEYS = ("train.epochs", "train.batch_size", "train.grad_accum", "train.eval_every_steps")


def check_sweep(cfg: PlatformConfig) -> Space:
    """Validate ``tune.*`` and the space together; returns the space.

    Raises:
        ConfigError: a bad space entry, a metric the trainer does not report, a space ``grid`` cannot enumerate
            within ``tune.num_samples``, grid keys under Optuna, or Optuna not installed.
    """
    t = cfg.tune
    pref = cfg.train.preference.method
    reported = [m for m in REPORTED_METRICS if not (pref and m in ("eval_perplexity", "eval_tokens"))]
    reported += list(PREFERENCE_METRICS) if pref else []
    if t.metric not in reported:
        runs = f"a train.preference.method={pref} run" if pref else "the trainer"
        raise ConfigError(f"tune.metric: {runs} does not report {t.metric!r}; use one of {', '.join(reported)}")
    if t.metric in ("eval_exact_match", "eval_rouge_l") and not cfg.train.eval_generation_samples:
        raise ConfigError(
            f"tune.metric: {t.metric!r} is reported only with generation metrics on: set "
            "train.eval_generation_samples (e.g. 16)"
        )
    space = load_space(t.space, cfg)
    if t.search == "grid":
        n = space.enumerable_size()
        if n is None:
            cont = [p.key for p in space.params if p.dist not in ("choice", "grid")]
            raise ConfigError(
                f"tune.space {space.source}: {', '.join(cont)}: tune.search=grid can only enumerate choice/grid "
                "keys; list the values, or use tune.search=random or optuna"
            )
        if n > t.num_samples:
            raise ConfigError(
                f"tune.space {space.source}: {n} combinations but tune.num_samples={t.num_samples}: grid search "
                f"runs each combination once; set tune.num_samples={n}, shrink the space, or use tune.search=random"
            )
    if t.scheduler == "pbt":
        _check_pbt(cfg, space)
    if t.search == "optuna":
        grids = [p.key for p in space.params if p.dist == "grid"]
        if grids:
            raise ConfigError(
                f"tune.space {space.source}: {', '.join(grids)}: Optuna cannot take grid keys; use choice instead"
            )
        _import_optuna()
    return space


def _check_pbt(cfg: PlatformConfig, space: Space) -> None:
    t, tc = cfg.tune, cfg.train
    fixed = [p.key for p in space.params if p.key not in PBT_MUTABLE or p.of is not None]
    if fixed:
        raise ConfigError(
            f"tune.space {space.source}: {', '.join(fixed)}: cannot change in the middle of a run, so "
            f"tune.scheduler=pbt cannot perturb them; PBT searches only {', '.join(PBT_MUTABLE)}. Set the others "
            "in the config, or use tune.scheduler=asha to search them"
        )
    if t.search == "optuna":
        raise ConfigError("tune.scheduler=pbt chooses new values itself: use tune.search=random or grid with it")
    every = trial_base(cfg).train  # the trials' schedule: tune.eval_every_steps, the checkpoints PBT adds
    ckpt = every.checkpoint_every_steps
    if t.perturbation_unit == "step" and ckpt and t.perturbation_interval % ckpt:
        if tc.checkpoint_every_steps:
            raise ConfigError(
                f"tune.perturbation_interval={t.perturbation_interval} steps is not a multiple of "
                f"train.checkpoint_every_steps={ckpt}: PBT exploits checkpoints, so perturb where one is written "
                "(or unset train.checkpoint_every_steps: the sweep then checkpoints at each perturbation)"
            )
        raise ConfigError(
            f"tune.perturbation_interval={t.perturbation_interval} steps is not a multiple of the trials' "
            f"evaluation interval ({ckpt} steps, tune.eval_every_steps or train.eval_every_steps): PBT checkpoints "
            "at every report and exploits those checkpoints, so make the perturbation interval a multiple of it"
        )
    if every.eval_every_steps and ckpt and every.eval_every_steps % ckpt:
        raise ConfigError(
            f"tune.scheduler=pbt: a trial evaluates every {every.eval_every_steps} steps but checkpoints every "
            f"{ckpt} (train.checkpoint_every_steps); PBT exploits the checkpoint of each report, so make the "
            "evaluation interval a multiple of it, or unset train.checkpoint_every_steps (the sweep then "
            "checkpoints at every evaluation)"
        )


def trial_base(cfg: PlatformConfig) -> PlatformConfig:
    """The config every trial starts from: the trials' budget (``tune.epochs``, ``tune.eval_every_steps``) in
    place of ``train.epochs`` and ``train.eval_every_steps``, and with PBT a checkpoint at every report (the
    state it hands over): at every evaluation, or at every perturbation in steps. The best trial's config file
    is written from it, so that ``aigc train --config best_config.yaml`` trains what the trial trained."""
    t = cfg.tune
    values: dict[str, Any] = {}
    if t.epochs is not None:
        values["train.epochs"] = t.epochs
    if t.eval_every_steps is not None:
        values["train.eval_every_steps"] = t.eval_every_steps
    evals = values.get("train.eval_every_steps", cfg.train.eval_every_steps)
    if t.scheduler == "pbt" and not cfg.train.checkpoint_every_steps:
        # PBT hands a trial the checkpoint of another's latest report: every report needs one
        if evals:
            values["train.checkpoint_every_steps"] = evals
        elif t.perturbation_unit == "step":
            values["train.checkpoint_every_steps"] = t.perturbation_interval
    return with_values(cfg, values) if values else cfg


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError(
            "tune.search=optuna needs Optuna: from the project's checkout, pip install -c constraints.txt -e '.[tune]' "
            "(or use tune.search=random)"
        ) from None
    return optuna


def trial_count(cfg: PlatformConfig, space: Space) -> int:
    """Trials the sweep runs: each combination once for grid search, else num_samples x the grid keys' size."""
    if cfg.tune.search == "grid":
        return space.enumerable_size() or 1
    return cfg.tune.num_samples * space.grid_size()


def max_reports(cfg: PlatformConfig, space: Space, rows_train: int) -> int:
    """An upper bound on the reports one trial makes (the scheduler's ``max_t``), over the space's extremes.

    Overestimating is harmless (trials end on their own); underestimating would stop long trials early.
    """
    axes = [[(p.key, v) for v in p.extremes()] for p in space.params if p.key in _LENGTH_KEYS and p.of is None]
    most = 1
    for combo in itertools.product(*axes):
        t = with_values(cfg, dict(combo)).train if combo else cfg.train
        micro = math.ceil(max(rows_train // cfg.tune.num_workers_per_trial, 1) / t.batch_size)
        steps = math.ceil(micro / t.grad_accum)
        per_epoch = 1 + (steps // t.eval_every_steps if t.eval_every_steps else 0)
        if t.checkpoint_every_steps:
            per_epoch += steps // t.checkpoint_every_steps
        most = max(most, t.epochs * per_epoch)
    return most


def build_search(cfg: PlatformConfig, param_space: dict[str, Any], at_once: int = 1) -> tuple[Any, dict[str, Any]]:
    """(search algorithm or None, the param_space to give the Tuner) for ``tune.search``.

    Args:
        at_once: trials running side by side (Optuna proposes at most that many before results come back).
    """
    t = cfg.tune
    if t.search != "optuna":
        if t.seed is None:
            return None, param_space
        from ray.tune.search import BasicVariantGenerator

        # Tune's default search, seeded; it takes the concurrency limit itself (Tune ignores
        # max_concurrent_trials beside a search generator)
        return BasicVariantGenerator(random_state=t.seed, max_concurrent=max(1, at_once)), param_space
    optuna = _import_optuna()
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    # TPE learns from finished trials: the limit keeps it from proposing every trial before any has reported.
    alg = OptunaSearch(
        metric=t.metric, mode=t.mode, sampler=optuna.samplers.TPESampler(seed=t.seed, n_startup_trials=2)
    )
    return ConcurrencyLimiter(alg, max_concurrent=max(1, at_once)), param_space


def build_scheduler(cfg: PlatformConfig, max_t: int, space: Space | None = None) -> Any:
    """The trial scheduler for ``tune.scheduler`` (None = run every trial to completion).

    Args:
        max_t: the most reports a trial makes (ASHA's budget).
        space: the searched keys, which PBT perturbs (needed for ``pbt``).
    """
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule, PopulationBasedTraining

    t = cfg.tune
    if t.scheduler == "pbt":
        if space is None:
            raise ValueError("tune.scheduler=pbt needs the space whose keys it perturbs")
        return PopulationBasedTraining(
            time_attr=t.perturbation_unit,  # the loop reports "epoch" and "step" at every evaluation
            metric=t.metric,
            mode=t.mode,
            perturbation_interval=t.perturbation_interval,
            hyperparam_mutations=_mutations(space),
        )
    if t.scheduler == "asha":
        return ASHAScheduler(
            metric=t.metric,
            mode=t.mode,
            time_attr="training_iteration",
            max_t=max(max_t, 1),
            grace_period=min(t.grace_period, max_t),
            reduction_factor=t.reduction_factor,
        )
    if t.scheduler == "median":
        return MedianStoppingRule(
            metric=t.metric, mode=t.mode, time_attr="training_iteration", grace_period=t.grace_period
        )
    return None


def _mutations(space: Space) -> dict[str, Any]:
    """PBT's ``hyperparam_mutations``: the values of a choice/grid key as a list (PBT moves to a neighbouring
    one), else the key's distribution (PBT multiplies the value by 0.8 or 1.2, or resamples it)."""
    out = to_param_space(space)
    for p in space.params:
        if p.dist in ("choice", "grid"):
            out[p.key] = list(p.args)
    return out

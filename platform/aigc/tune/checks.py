"""What ``aigc sweep`` checks before any Ray work: the search space, search and scheduler, then the trials' base
run as ``aigc train`` checks it."""

from __future__ import annotations

from aigc.config import PlatformConfig
from aigc.train import checks as train_checks
from aigc.tune.search import check_sweep

__all__ = ["check"]


def check(cfg: PlatformConfig, *, preprocessed: bool = True) -> PlatformConfig:
    """Check a sweep; returns ``cfg`` with its model resolved (tokenizer and config only).

    Raises:
        ConfigError: a bad space, search, metric or grid; PBT without its keys; Optuna not installed; and
            whatever :func:`aigc.train.checks.check` raises.
    """
    check_sweep(cfg)
    return train_checks.check(cfg, preprocessed=preprocessed)

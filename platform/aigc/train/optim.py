"""Optimizer and learning-rate schedule of a training worker, from ``train.*``."""

from __future__ import annotations

from typing import Any

import torch

from aigc.config import TrainConfig

__all__ = [
    "build_optimizer",
    "build_scheduler",
    "param_groups",
    "reapply_hyperparams",
    "run_hyperparams",
    "warmup_steps",
]

_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: weight decay on weight matrices, none on biases and norm weights.

    One-dimensional parameters (biases, RMSNorm/LayerNorm scales, DoRA magnitudes) are the ones decay only hurts.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: Any, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters at ``train.lr`` with ``train.weight_decay``."""
    return torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr)


def warmup_steps(tc: TrainConfig, total_steps: int) -> int:
    """``train.warmup_steps`` when set, else ``warmup_ratio`` of the run's optimizer steps."""
    return tc.warmup_steps if tc.warmup_steps is not None else int(tc.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig, total_steps: int) -> Any:
    """Linear warmup, then ``train.lr_scheduler`` (constant, or linear/cosine decay to 0 at the last step)."""
    from transformers import get_scheduler

    return get_scheduler(
        _SCHEDULES[tc.lr_scheduler],
        optimizer,
        num_warmup_steps=min(warmup_steps(tc, total_steps), total_steps),
        num_training_steps=max(1, total_steps),
    )


def run_hyperparams(optimizer: torch.optim.Optimizer) -> list[dict[str, float]]:
    """Each param group's peak lr (``initial_lr``, set by the schedule) and weight decay, as built from ``train.*``."""
    return [{"initial_lr": g["initial_lr"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]


def reapply_hyperparams(optimizer: torch.optim.Optimizer, scheduler: Any, hyper: list[dict[str, float]]) -> None:
    """Put this run's peak lr and weight decay (``hyper``, from :func:`run_hyperparams`) back after a checkpoint's
    optimizer and schedule state were loaded, keeping the schedule's position.

    Loading restores the checkpoint's own values. A population-based-training trial continues a better trial's
    checkpoint with a perturbed ``train.lr``/``weight_decay``, which must win; on a plain resume they are equal.
    The lr becomes the new peak x the schedule's factor at the restored step (a ``LambdaLR``, as built above).
    """
    scheduler.base_lrs = [h["initial_lr"] for h in hyper]
    for group, h, factor in zip(optimizer.param_groups, hyper, scheduler.lr_lambdas, strict=True):
        group.update(h)
        group["lr"] = h["initial_lr"] * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports

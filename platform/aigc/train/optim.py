"""Optimizer and learning-rate schedule of a training worker, from ``train.*``."""

from __future__ import annotations

from typing import Any

import torch

from aigc.config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler", "param_groups", "warmup_steps"]

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

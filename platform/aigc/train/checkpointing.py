"""What a training checkpoint holds, and writing/reading it on every rank.

A checkpoint directory::

    adapter/          the trained weights (``save_pretrained``: a PEFT adapter, or the whole model)
    train_state.pt    optimizer, LR scheduler, every rank's RNG states, the position in the data
                      (epoch, micro-batches of it consumed, optimizer step), early-stopping state, per-step losses
    history.json      one entry per report (evaluation) up to this checkpoint
    steps.json        the train loss of every optimizer step up to this checkpoint

With the position and the RNG states, a run resumed from a mid-epoch checkpoint continues with the next unseen
batch and the same dropout draws: on CPU with a fixed seed it reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from aigc.train import optim, weights
from aigc.train.worker_config import WorkerConfig

__all__ = [
    "ADAPTER_SUBDIR",
    "HISTORY_FILE",
    "STATE_FILE",
    "STEPS_FILE",
    "TrainState",
    "load_checkpoint",
    "save_checkpoint",
]

ADAPTER_SUBDIR = "adapter"
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
STEPS_FILE = "steps.json"


@dataclass
class TrainState:
    """Where a run is: enough to continue it exactly.

    Attributes:
        epoch: the epoch in progress (0-based).
        micro: micro-batches of that epoch already trained on (each worker's own count; equal on all ranks).
        step: optimizer steps taken so far.
        best_eval: lowest eval loss seen (early stopping); ``evals_since_best``: evaluations since it.
        initial_eval: the eval loss before any training (the baseline on the loss plot).
        history: one metrics dict per report.
        step_losses: the train loss of every optimizer step, all ranks together.
    """

    epoch: int = 0
    micro: int = 0
    step: int = 0
    best_eval: float | None = None
    evals_since_best: int = 0
    initial_eval: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective; ``[obj]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(path: str, model: Any, wc: WorkerConfig, optimizer: Any, scheduler: Any, state: TrainState,
                    rank: int) -> None:  # fmt: skip
    """Write a checkpoint of this run into the local directory ``path`` (a collective: every rank calls it)."""
    weights.save_weights(model, wc, os.path.join(path, ADAPTER_SUBDIR), rank)
    optimizer_state = weights.optimizer_state(model, optimizer)
    rngs = _gather(_rng_state())
    if rank != 0:
        return
    payload = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rngs, "state": asdict(state)}
    torch.save(payload, os.path.join(path, STATE_FILE))
    with open(os.path.join(path, HISTORY_FILE), "w") as f:
        json.dump(state.history, f, indent=1)
    with open(os.path.join(path, STEPS_FILE), "w") as f:
        json.dump(state.step_losses, f)


def load_checkpoint(path: str, model: Any, wc: WorkerConfig, optimizer: Any, scheduler: Any, rank: int) -> TrainState:
    """Restore weights, optimizer, schedule and this rank's RNG from ``path``; the run's position is returned.

    The run's own peak lr and weight decay (``train.*``) win over the checkpoint's: a population-based-training
    trial continues another trial's checkpoint with perturbed values (:func:`aigc.train.optim.reapply_hyperparams`).
    """
    weights.load_weights(model, wc, os.path.join(path, ADAPTER_SUBDIR))
    payload = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
    hyper = optim.run_hyperparams(optimizer)
    weights.load_optimizer_state(model, optimizer, payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    optim.reapply_hyperparams(optimizer, scheduler, hyper)
    rngs = payload["rng"]
    _set_rng_state(rngs[rank % len(rngs)])
    return TrainState(**payload["state"])

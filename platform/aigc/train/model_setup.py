"""The model a training worker trains: base model + method (LoRA / full), the parallel wrapper, precision, and
how its trainable weights are saved to and loaded from a checkpoint.

Every function here that touches a wrapped model's weights is a collective under FSDP: all ranks call it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

__all__ = ["autocast", "build_model", "load_weights", "prepare", "save_weights", "unwrap"]


def unwrap(model: Any) -> Any:
    """The model inside a DDP/FSDP wrapper."""
    return model.module if hasattr(model, "module") else model


def build_model(wc: Any, device: torch.device) -> Any:
    """The base model on ``device`` with ``train.method`` applied, in train mode (``wc`` is a WorkerConfig)."""
    from aigc.models.loading import apply_lora, load_base_model

    m = wc.model
    model = load_base_model(m.name_or_path, m.dtype, str(device), m.trust_remote_code)
    if wc.train.method == "lora":
        lo = wc.lora
        model = apply_lora(model, lo.r, lo.alpha, lo.dropout, lo.target_modules)
    model.train()
    return model


def prepare(model: Any, wc: Any) -> Any:
    """Wrap for ``train.strategy`` through Ray Train (DDP; moves the model to the worker's device)."""
    import ray.train.torch

    return ray.train.torch.prepare_model(model)


def autocast(wc: Any, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's precision context for ``train.mixed_precision``."""
    return contextlib.nullcontext()


def save_weights(model: Any, wc: Any, path: str, rank: int) -> None:
    """Write the trainable weights as a ``save_pretrained`` directory at ``path`` (rank 0 writes)."""
    if rank == 0:
        unwrap(model).save_pretrained(path)


def load_weights(model: Any, wc: Any, path: str) -> None:
    """Load weights written by :func:`save_weights` into ``model`` (every rank)."""
    from safetensors.torch import load_file

    inner = unwrap(model)
    if wc.train.method == "full":
        inner.load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=False)
        return
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(inner, load_file(os.path.join(path, "adapter_model.safetensors")))


def optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer's full state for a checkpoint (a collective under FSDP; rank 0's copy is the one saved)."""
    return optimizer.state_dict()


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Load a state written by :func:`optimizer_state` (every rank)."""
    optimizer.load_state_dict(state)

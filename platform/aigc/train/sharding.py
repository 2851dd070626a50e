"""FSDP for ``train.strategy=fsdp``: how the model is sharded, and how full weights and optimizer state are
gathered from the shards (to save) and scattered back into them (to load).

Parameters are sharded per decoder layer (the classes the model lists in ``_no_split_modules``), with
``use_orig_params=True`` so one shard can hold frozen base weights beside trainable LoRA weights. Every function
here is a collective: all ranks call it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    StateDictType,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

__all__ = [
    "FSDP",
    "fsdp_kwargs",
    "full_state_dict",
    "is_fsdp",
    "layer_classes",
    "load_full_state_dict",
    "load_optim_state",
    "optim_state",
]


def is_fsdp(model: Any) -> bool:
    """Whether ``model`` is an FSDP wrapper (a single worker's model stays unwrapped)."""
    return isinstance(model, FSDP)


def layer_classes(model: torch.nn.Module) -> set[type]:
    """The module classes FSDP shards one by one: the model's ``_no_split_modules`` (its decoder layers)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(
            f"{type(inner).__name__} names no decoder-layer class (_no_split_modules) to shard by; "
            "use train.strategy=ddp for this model"
        )
    return classes


def fsdp_kwargs(model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """FullyShardedDataParallel arguments: shard by decoder layer, keep original parameters (LoRA's mix)."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    kwargs: dict[str, Any] = {
        "auto_wrap_policy": functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_classes(model)),
        "use_orig_params": True,
    }
    # FSDP infers a CPU model's device as "no accelerator" and refuses; named explicitly, CPU (gloo) works
    kwargs["device_id"] = device
    return kwargs


@contextlib.contextmanager
def _full_state(model: FSDP, rank0_only: bool) -> Iterator[None]:
    offload = next(model.parameters()).device.type != "cpu"  # gather on the CPU: a GPU holds one shard only
    with FSDP.state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
    ):
        yield


def full_state_dict(model: FSDP) -> dict[str, torch.Tensor]:
    """The whole model's state dict, gathered on rank 0's CPU (other ranks get an empty dict)."""
    with _full_state(model, rank0_only=True):
        return model.state_dict()


def load_full_state_dict(model: FSDP, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` (keys of the unwrapped model; may be a subset) into the shards; every rank passes it."""
    with _full_state(model, rank0_only=False):
        result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"weights for parameters the model does not have: {result.unexpected_keys[:5]}")


def optim_state(model: FSDP, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state keyed by parameter name, gathered on rank 0 (other ranks get ``{}``)."""
    with _full_state(model, rank0_only=True):
        return FSDP.optim_state_dict(model, optimizer)


def load_optim_state(model: FSDP, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state from :func:`optim_state` (every rank passes the full state) into this rank's shard."""
    with _full_state(model, rank0_only=False):
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, state))

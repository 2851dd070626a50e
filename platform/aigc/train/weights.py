"""The trained weights and the optimizer state in and out of a checkpoint, with DDP or FSDP.

The weights are written as a ``save_pretrained`` directory (a PEFT adapter for lora/qlora, the whole model for
full), which :mod:`aigc.train.publish` exports unchanged; the optimizer state as one full state dict. Under
FSDP each function here is a collective: every rank calls it (the full state is gathered onto rank 0's CPU).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from aigc.train import sharding
from aigc.train.worker_config import WorkerConfig

__all__ = ["load_optimizer_state", "load_weights", "optimizer_state", "save_weights", "unwrap"]


def unwrap(model: Any) -> Any:
    """The model inside a DDP/FSDP wrapper."""
    return model.module if hasattr(model, "module") else model


def save_weights(model: Any, wc: WorkerConfig, path: str, rank: int) -> None:
    """Write the trained weights as a ``save_pretrained`` directory at ``path`` (rank 0 writes).

    A PEFT adapter for lora/qlora, the whole model for full. Collective: under FSDP every rank must call it
    (the full state dict is gathered onto rank 0's CPU first).
    """
    if not sharding.is_fsdp(model):
        if rank == 0:
            inner = unwrap(model)
            # only the trained adapter: a DPO run from train.init_adapter also holds its frozen reference
            selected = {"selected_adapters": ["default"]} if hasattr(inner, "peft_config") else {}
            inner.save_pretrained(path, **selected)
        return
    state = sharding.full_state_dict(model)
    if rank != 0:
        return
    inner = unwrap(model)
    if wc.train.method == "full":
        inner.save_pretrained(path, state_dict=state)
        return
    from peft import get_peft_model_state_dict

    adapter = get_peft_model_state_dict(_peft_twin(inner, wc), state_dict=state)
    config = copy.deepcopy(inner.peft_config["default"])
    config.inference_mode = True  # as peft's own save_pretrained writes it
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in adapter.items()}, os.path.join(path, "adapter_model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip


def _peft_twin(inner: Any, wc: WorkerConfig) -> Any:
    """A weightless (meta device) twin of the peft model ``inner`` with the same adapter.

    Under FSDP the module names of ``inner`` carry ``_fsdp_wrapped_module`` parts that the gathered state dict
    does not, and peft matches adapter weights by module name; the twin's names are the plain ones.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(
            inner.get_base_model().config, trust_remote_code=wc.model.trust_remote_code
        )
        return get_peft_model(base, copy.deepcopy(inner.peft_config["default"]), low_cpu_mem_usage=True)


def _adapter_file(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def _model_file(path: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):  # one file, or the shards of a large model
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(path, name)))
    return state


def _peft_load_keys(peft_model: Any, adapter_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adapter file's tensors under the peft model's own parameter names (adapter name put back, DoRA and
    ``modules_to_save`` remapped): peft's own mapping, with its final ``load_state_dict`` captured."""
    from peft import set_peft_model_state_dict

    captured: dict[str, torch.Tensor] = {}

    def capture(state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:
        captured.update(state)
        return torch.nn.modules.module._IncompatibleKeys([], [])

    peft_model.load_state_dict = capture
    try:
        set_peft_model_state_dict(peft_model, adapter_state)
    finally:
        del peft_model.load_state_dict
    return captured


def load_weights(model: Any, wc: WorkerConfig, path: str) -> None:
    """Load weights written by :func:`save_weights` into ``model`` (every rank; collective under FSDP)."""
    full = wc.train.method == "full"
    state = _model_file(path) if full else _adapter_file(path)
    inner = unwrap(model)
    if sharding.is_fsdp(model):
        sharding.load_full_state_dict(model, state if full else _peft_load_keys(_peft_twin(inner, wc), state))
    elif full:
        inner.load_state_dict(state, strict=False)
    else:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(inner, state)


def optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer's full state for a checkpoint (a collective under FSDP; rank 0's copy is the one saved)."""
    if sharding.is_fsdp(model):
        return sharding.optim_state(model, optimizer)
    return optimizer.state_dict()


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Load a state written by :func:`optimizer_state` (every rank passes the whole state)."""
    if sharding.is_fsdp(model):
        sharding.load_optim_state(model, optimizer, state)
    else:
        optimizer.load_state_dict(state)

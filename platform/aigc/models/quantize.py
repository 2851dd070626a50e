"""Serving a base model with quantized weights (``serve.quantization``), LoRA adapters applied on top in full
precision.

- ``int8`` on CPU: weight-only int8 with torchao (transformers' ``TorchAoConfig`` with ``Int8WeightOnlyConfig``:
  per-channel int8 weights, activations in the model's dtype) on every linear layer but the output head
  (``lm_head``, often tied to the input embeddings, which stay as they are). About a quarter of the float32
  weight memory for those layers.
- ``int8`` / ``nf4`` on CUDA: bitsandbytes at load time (LLM.int8, or 4-bit NF4 with the compute dtype of
  ``model.dtype``), as QLoRA training loads it (the ``gpu`` extra).
- ``nf4`` on CPU is refused: bitsandbytes' 4-bit kernels need CUDA.

Both are applied by transformers while loading (``from_pretrained(quantization_config=...)``). Adapters load onto
the quantized model unchanged (peft wraps each targeted linear layer and adds its LoRA product to the quantized
layer's output), so the registry's adapters serve as they are.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from aigc.errors import ConfigError, ModelUnavailableError

__all__ = ["Quantization", "check_quantization", "quantization_config"]

Quantization = Literal["none", "int8", "nf4"]
_KEPT = ("lm_head",)  # the output head keeps its weights (often tied to the input embeddings)


def check_quantization(mode: str, device: str) -> None:
    """Refuse a quantization this device cannot run, saying what to use instead.

    Raises:
        ConfigError: ``nf4`` on CPU.
    """
    if mode == "nf4" and not device.startswith("cuda"):
        raise ConfigError(
            "serve.quantization: 'nf4' needs a CUDA GPU (bitsandbytes 4-bit kernels); set serve.gpus_per_replica=1 "
            "on a GPU machine (install with the `gpu` extra), or use serve.quantization=int8 on CPU"
        )


def quantization_config(mode: str, device: str, compute_dtype: torch.dtype) -> Any | None:
    """The ``from_pretrained(quantization_config=...)`` for ``mode`` on ``device`` (None for ``none``).

    Raises:
        ConfigError: a mode ``device`` cannot run (see :func:`check_quantization`).
        ModelUnavailableError: the library the mode needs here is not installed.
    """
    check_quantization(mode, device)
    if mode == "none":
        return None
    if device.startswith("cuda"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ModelUnavailableError(
                f"serve.quantization={mode} on a GPU needs bitsandbytes: install the GPU extra "
                '(pip install -e ".[gpu]")'
            ) from None
        from transformers import BitsAndBytesConfig

        if mode == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError:
        raise ModelUnavailableError(
            'serve.quantization=int8 on CPU needs torchao: install the quant extra (pip install -e ".[quant]")'
        ) from None
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=list(_KEPT))

"""Loading base models and tokenizers, and wiring LoRA onto them.

Hub ids and local directories go through the same code. A config resolved on the driver
(:func:`aigc.models.hub.resolve_model`) hands these functions its snapshot (``model.load_path()``), which
:func:`~aigc.models.hub.local_model_dir` makes local on this node; nothing here downloads unless given a hub id.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from aigc.models.chat_template import ensure_chat_template
from aigc.models.hub import hub_id_of, local_model_dir

__all__ = ["load_tokenizer", "load_base_model", "resolve_dtype", "apply_lora", "model_id_for", "context_length"]


def model_id_for(name_or_path: str) -> str:
    """The id clients see for a base model: the hub id (also for its resolved snapshot), or a directory's name."""
    hub_id = hub_id_of(name_or_path)
    if hub_id is not None:
        return hub_id
    if os.path.isdir(name_or_path):
        return os.path.basename(os.path.normpath(name_or_path))
    return name_or_path


def resolve_dtype(dtype: str, device: str = "cpu") -> torch.dtype:
    """'auto' -> float32 on CPU, bfloat16 on a GPU that supports it, else float16."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """Tokenizer with a chat template and a pad token (eos when the tokenizer has none)."""
    from transformers import AutoTokenizer

    path = local_model_dir(name_or_path, weights=False)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return ensure_chat_template(tok)


def load_base_model(
    name_or_path: str,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    quantization: str = "none",
) -> Any:
    """Causal LM on ``device`` in eval mode, its weights quantized for serving if asked
    (:mod:`aigc.models.quantize`: torchao int8 on CPU, bitsandbytes int8/nf4 on CUDA).

    Raises:
        ConfigError: a quantization ``device`` cannot run (nf4 on CPU).
        ModelUnavailableError: the library a quantization needs is not installed.
    """
    from transformers import AutoModelForCausalLM

    from aigc.models.quantize import quantization_config

    torch_dtype = resolve_dtype(dtype, device)
    quant = quantization_config(quantization, device, torch_dtype)
    extra: dict[str, Any] = {} if quant is None else {"quantization_config": quant}
    if quant is not None and device.startswith("cuda"):
        extra["device_map"] = {"": device}  # bitsandbytes places the weights while loading
    model = AutoModelForCausalLM.from_pretrained(
        local_model_dir(name_or_path, weights=True), dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra
    )
    return (model if "device_map" in extra else model.to(device)).eval()


def apply_lora(
    model: Any,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | str,
    *,
    use_rslora: bool = False,
    use_dora: bool = False,
    modules_to_save: list[str] | None = None,
) -> Any:
    """Wrap ``model`` in a peft LoRA model; only adapter weights (and ``modules_to_save``) stay trainable.

    Args:
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r`` (rank-stabilised LoRA).
        use_dora: weight-decomposed LoRA (a trained magnitude per output feature; slower steps).
        modules_to_save: modules trained in full and stored in the adapter, e.g. ``["lm_head"]``.
    """
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        use_rslora=use_rslora,
        use_dora=use_dora,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def context_length(name_or_path: str) -> int | None:
    """The model's context in tokens (``max_position_embeddings``) when its config is at hand, else None.

    Reads a local directory's ``config.json`` (or a hub id already in the local cache); never downloads.
    """
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(local_model_dir(name_or_path, weights=False), local_files_only=True)
    except (OSError, ValueError):
        return None
    return getattr(cfg, "max_position_embeddings", None)

"""Loading base models and tokenizers, and wiring LoRA onto them.

Hub ids and local directories go through the same code; nothing here downloads unless a hub id is given.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from aigc.data.templates import ensure_chat_template

__all__ = ["load_tokenizer", "load_base_model", "resolve_dtype", "apply_lora", "model_id_for", "resolve_local_path"]


def model_id_for(name_or_path: str) -> str:
    """The id clients see for a base model: the hub id, or a local directory's name."""
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

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return ensure_chat_template(tok)


def load_base_model(
    name_or_path: str, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False
) -> Any:
    """Causal LM on ``device`` in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code
    )
    return model.to(device).eval()


def apply_lora(model: Any, r: int, alpha: float, dropout: float, target_modules: list[str] | str) -> Any:
    """Wrap ``model`` in a peft LoRA model; only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def _job_has_working_dir() -> bool:
    import ray

    try:
        return ray.is_initialized() and bool(ray.get_runtime_context().runtime_env.get("working_dir"))
    except Exception:  # no runtime context (not connected): treat as a plain local run
        return False


def resolve_local_path(path: str, is_local: bool | None = None, relative_in_working_dir: bool = True) -> str:
    """A path as Ray workers and replicas must see it. They do not start in this process's cwd (Serve replicas
    start in the cwd of the driver that first started Serve; Train workers in their run's directory), so a
    relative local path becomes absolute; except under a runtime_env
    ``working_dir`` (``ray job submit --working-dir .``), where every worker starts in its own copy of it.
    URIs pass through, and so do hub ids: a path is local if ``is_local`` says so, or else if it exists.
    ``relative_in_working_dir=False`` makes it absolute even then (Train workers run in their run's directory;
    the working dir is unpacked at the same place on every node)."""
    local = os.path.exists(path) if is_local is None else is_local
    keep = relative_in_working_dir and _job_has_working_dir()
    if "://" in path or os.path.isabs(path) or not local or keep:
        return path
    return os.path.abspath(path)

"""Which modules LoRA may adapt: ``lora.target_modules`` and ``lora.modules_to_save`` checked against the model.

peft matches a name when a module's dotted name equals it or ends with ``.<name>``. A name that matches nothing
would otherwise surface as a worker crash deep inside a Ray Train run (or, when other names do match, be ignored
silently); here it is a :class:`~aigc.errors.ConfigError` listing the linear layers the model has. The driver
runs the check on a weightless skeleton (meta device) before any cluster work.
"""

from __future__ import annotations

from typing import Any

import torch

from aigc.errors import ConfigError

__all__ = ["check_target_modules", "linear_module_names", "missing_modules", "raise_for_missing"]


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names (last dotted part) of the model's linear layers, deduplicated, in model order."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        # transformers' Conv1D (GPT-2 style) is a linear layer that peft adapts too
        if name and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def missing_modules(model: torch.nn.Module, names: list[str]) -> list[str]:
    """The entries of ``names`` that match no module of ``model`` (peft's rule: equal, or ends with ``.name``)."""
    module_names = [n for n, _ in model.named_modules() if n]
    return [t for t in names if not any(n == t or n.endswith("." + t) for n in module_names)]


def raise_for_missing(model: torch.nn.Module, lora_cfg: Any, model_name: str) -> None:
    """Raise a ConfigError when ``lora.target_modules`` or ``lora.modules_to_save`` name modules ``model`` lacks.

    Raises:
        ConfigError: naming the missing entries and listing the model's linear layers.
    """
    checks = [("target_modules", lora_cfg.target_modules), ("modules_to_save", lora_cfg.modules_to_save)]
    for key, names in checks:
        if not isinstance(names, list):  # "all-linear" or unset
            continue
        missing = missing_modules(model, names)
        if missing:
            raise ConfigError(
                f"lora.{key}: {model_name} has no module named {', '.join(missing)}; its linear layers are "
                f"{', '.join(linear_module_names(model))} (or use lora.target_modules=all-linear)"
            )


def check_target_modules(model_cfg: Any, lora_cfg: Any) -> bool:
    """Check ``lora`` against the model's architecture, built from its config alone (no weights, no download).

    Reads the ``config.json`` of the resolved snapshot (``model.load_path()``; or of a hub id already in the local
    cache when unresolved); a model whose config is not at hand is checked on the workers instead (same error).
    Returns whether it checked.

    Raises:
        ConfigError: a target module or module to save that the model does not have.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from aigc.models.hub import local_model_dir

    if lora_cfg.target_modules == "all-linear" and not lora_cfg.modules_to_save:
        return False
    try:
        config = AutoConfig.from_pretrained(
            local_model_dir(model_cfg.load_path(), weights=False),
            local_files_only=True,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    except (OSError, ValueError):
        return False
    with torch.device("meta"):  # the module tree without allocating a single weight
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    raise_for_missing(skeleton, lora_cfg, model_cfg.name_or_path)
    return True

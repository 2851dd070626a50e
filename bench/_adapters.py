"""LoRA adapters with random weights, for the serving benchmarks (answers differ per adapter)."""

from __future__ import annotations

import tempfile


def random_adapter_dir(base: str, name: str, seed: int, r: int = 8, **lora) -> str:
    """A PEFT directory holding a LoRA adapter on every linear layer of ``base`` with seeded random weights.

    peft starts ``lora_B`` at zero (an adapter that changes nothing); random values in both matrices make each
    adapter answer differently. ``lora`` overrides further ``LoraConfig`` fields (``lora_alpha``, ``use_rslora``).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=r, target_modules="all-linear", **lora)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "lora_" in param_name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    out = tempfile.mkdtemp(prefix=f"{name}-adapter-")
    model.save_pretrained(out)
    return out


def register_random_adapter(base: str, registry_dir: str, name: str, seed: int, r: int = 8) -> str:
    """:func:`random_adapter_dir`, registered as ``name``; returns the registered version's id (``name:vN``)."""
    from aigc.registry import Registry

    return Registry(registry_dir).register(name, random_adapter_dir(base, name, seed, r), base_model=base).model_id

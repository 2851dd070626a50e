"""Registered LoRA adapters with random weights, for the serving benchmarks (answers differ per adapter)."""

from __future__ import annotations

import tempfile


def register_random_adapter(base: str, registry_dir: str, name: str, seed: int, r: int = 8) -> str:
    """A LoRA adapter on every linear layer of ``base`` with seeded random weights, registered as ``name``.

    peft starts ``lora_B`` at zero (an adapter that changes nothing); random values in both matrices make each
    adapter answer differently. Returns the registered version's model id (``name:vN``).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from aigc.registry import Registry

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=r, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "lora_" in param_name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    out = tempfile.mkdtemp(prefix=f"{name}-adapter-")
    model.save_pretrained(out)
    return Registry(registry_dir).register(name, out, base_model=base).model_id

"""``aigc export``: a registered model as a directory other tools open without this platform.

- ``--merge``: base model + LoRA adapter merged into one model (``merge_and_unload``), written as safetensors
  with the tokenizer; ``AutoModelForCausalLM.from_pretrained(dir)`` opens it, as do vLLM and TGI. Costs the
  base model's size on disk; serves without peft and without the adapter's extra matmuls.
- without ``--merge``: the adapter directory as registered (a plain PEFT directory, a few MB).

A full fine-tune is already a whole model: it is copied as it is either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from aigc import storage
from aigc.errors import RegistryError
from aigc.registry.store import AdapterVersion, Registry

__all__ = ["Exported", "export_model", "resolve_entry"]


@dataclass
class Exported:
    """What was written: the registry entry it came from, where, and whether it is a merged model."""

    entry: AdapterVersion
    out_dir: str
    merged: bool


def resolve_entry(registry: Registry, model_id: str) -> AdapterVersion:
    """``name`` (latest version) or ``name:vN`` -> the entry, with the known ids in the error when it is missing.

    Raises:
        RegistryError: malformed id, unknown name or version (the message lists what the registry holds).
    """
    try:
        return registry.resolve(model_id)
    except RegistryError as exc:
        known = [e.model_id for e in registry.list()]
        shown = ", ".join(known) if known else "none: train one with `aigc train`"
        raise RegistryError(f"{exc}. Registered models: {shown}") from None


def export_model(registry_dir: str, model_id: str, out_dir: str, merge: bool = False) -> Exported:
    """Write the registered ``model_id`` to ``out_dir`` (replaced if it exists; local path or URI).

    Raises:
        RegistryError: ``model_id`` names nothing registered.
    """
    registry = Registry(registry_dir)
    entry = resolve_entry(registry, model_id)
    src = registry.local_adapter_dir(entry)
    if entry.kind == "full" or not merge:
        storage.replace_dir(src, out_dir)  # whole or not at all, as training publishes its export
        return Exported(entry, out_dir, merged=entry.kind == "full")
    _write_merged(entry, src, out_dir)
    return Exported(entry, out_dir, merged=True)


def _write_merged(entry: AdapterVersion, adapter_dir: str, out_dir: str) -> None:
    """Base + adapter, merged in float32 on the CPU, saved in the base model's own dtype."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig

    from aigc.config import ModelConfig
    from aigc.models.hub import is_hub_id, local_model_dir, resolve_model
    from aigc.models.loading import load_base_model, load_tokenizer

    trust = bool(entry.config.get("model", {}).get("trust_remote_code", False))
    # a hub base model at the commit the adapter was trained on, when the registry recorded one
    revision = entry.base_model_commit if is_hub_id(entry.base_model) else None
    resolved = resolve_model(ModelConfig(name_or_path=entry.base_model, revision=revision, trust_remote_code=trust),
                             weights=True)  # fmt: skip
    base_dir = local_model_dir(resolved.load_path(), weights=True)
    dtype = getattr(AutoConfig.from_pretrained(base_dir, trust_remote_code=trust), "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    base = load_base_model(base_dir, "float32", "cpu", trust)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    if isinstance(dtype, torch.dtype) and dtype != torch.float32:
        merged = merged.to(dtype)
    # the adapter directory holds the tokenizer (and chat template) the model was trained with
    tok = load_tokenizer(adapter_dir if storage.is_file(storage.join(adapter_dir, "tokenizer_config.json"))
                         else base_dir, trust)  # fmt: skip
    storage.remove_tree(out_dir)
    with storage.local_staging(out_dir) as local:
        merged.save_pretrained(local)
        tok.save_pretrained(local)

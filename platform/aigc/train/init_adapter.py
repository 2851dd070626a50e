"""Starting a LoRA run from an existing adapter (``train.init_adapter``): a registered version or a directory.

On the driver, :func:`resolve_init_adapter` pins the setting to the adapter's own weights (a registered id is
resolved once: ``support-bot:prod`` becomes the location of the version the alias names now, so a later promote
never changes a running or resumed run) and replaces the lora section with the adapter's own settings: the run,
its checkpoints and its registered config all describe the adapter actually trained.

On each worker, :func:`start_from_adapter` loads those weights into the fresh peft model. With DPO it also loads
them a second time, frozen, as the :data:`REFERENCE_ADAPTER` (TRL's "load the adapter twice"): the reference of a
round that starts from a fine-tuned adapter is that adapter, not the bare base, for the memory of one more adapter
and no second copy of the base weights.
"""

from __future__ import annotations

import os
from typing import Any

from aigc import storage
from aigc.config import PlatformConfig, TrainConfig
from aigc.config.loading import with_values
from aigc.errors import ConfigError

__all__ = ["REFERENCE_ADAPTER", "resolve_init_adapter", "start_from_adapter"]

REFERENCE_ADAPTER = "reference"
"""The peft adapter name of DPO's frozen reference when a run starts from an adapter."""

_CONFIG = "adapter_config.json"


def _locate(source: str, registry_dir: str) -> tuple[str, str]:
    """``(weights location, what to call it)`` of ``train.init_adapter``: a directory holding an adapter, else a
    registered model id."""
    if storage.is_file(storage.join(source, _CONFIG)):
        return source, source
    from aigc.registry import Registry, RegistryError

    try:
        entry = Registry(registry_dir).resolve(source)
    except (RegistryError, KeyError) as exc:
        raise ConfigError(
            f"train.init_adapter {source!r} is neither an adapter directory (no {_CONFIG} there) nor a registered "
            f"model: {exc}"
        ) from None
    if entry.kind != "lora":
        raise ConfigError(f"train.init_adapter {source!r} is {entry.model_id}, a full model, not a LoRA adapter")
    return entry.adapter_uri, entry.model_id


def _lora_values(conf: dict[str, Any], shown: str) -> dict[str, Any]:
    """The lora section's keys as the adapter's ``adapter_config.json`` sets them."""
    if conf.get("peft_type") != "LORA":
        raise ConfigError(f"train.init_adapter {shown!r} is a {conf.get('peft_type')} adapter; only LoRA continues")
    targets = conf.get("target_modules")
    return {
        "lora.r": int(conf["r"]),
        "lora.alpha": float(conf["lora_alpha"]),
        "lora.dropout": float(conf.get("lora_dropout") or 0.0),
        "lora.target_modules": targets if isinstance(targets, str) else sorted(targets),
        "lora.use_rslora": bool(conf.get("use_rslora")),
        "lora.use_dora": bool(conf.get("use_dora")),
        "lora.modules_to_save": conf.get("modules_to_save") or None,
    }


def resolve_init_adapter(cfg: PlatformConfig) -> PlatformConfig:
    """``cfg`` with ``train.init_adapter`` pinned to the adapter's weights and the lora section set from it;
    ``cfg`` itself when the run starts from a fresh adapter. Prints one line naming where the run starts.

    Raises:
        ConfigError: the setting names neither an adapter directory nor a registered LoRA version.
    """
    source = cfg.train.init_adapter
    if not source:
        return cfg
    location, shown = _locate(source, cfg.registry_dir)
    conf = storage.read_json(storage.join(location, _CONFIG))
    values = _lora_values(conf, shown)
    changed = [k for k, v in values.items() if v != getattr(cfg.lora, k.split(".")[1])]
    note = f"; its settings replace {', '.join(changed)}" if changed else ""
    print(f"[train] starting from adapter {shown} ({location}){note}", flush=True)
    return with_values(cfg, {"train.init_adapter": location, **values})


def start_from_adapter(model: Any, train: TrainConfig) -> Any:
    """Load ``train.init_adapter``'s weights into the fresh peft ``model`` (built with the same lora settings);
    with DPO, also as the frozen :data:`REFERENCE_ADAPTER`.

    Raises:
        ConfigError: the adapter's weights do not fit the model (another base model).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = storage.local_dir(train.init_adapter)
    weights = load_file(os.path.join(path, "adapter_model.safetensors"))
    loaded = set_peft_model_state_dict(model, weights)
    unexpected = list(getattr(loaded, "unexpected_keys", []) or [])
    if unexpected:
        raise ConfigError(
            f"train.init_adapter {train.init_adapter!r} does not fit this base model ({len(unexpected)} weights have "
            f"no place, e.g. {unexpected[0]}): train it on model.name_or_path's model"
        )
    if train.preference.method == "dpo":
        model.load_adapter(path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        model.set_adapter("default")
    return model

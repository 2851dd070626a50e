"""Which model a batch run uses: ``base``, or a registered version resolved once on the driver.

``name@vN`` is accepted as ``name:vN``; aliases (``name:stable``) resolve to the version they name now, so every
row of a run (and a resumed run) uses one version, recorded in each output row.
"""

from __future__ import annotations

from dataclasses import dataclass

from aigc.config import PlatformConfig
from aigc.config.generate import BASE_MODEL
from aigc.errors import ConfigError, InvalidRequestError, RegistryError
from aigc.models.loading import model_id_for
from aigc.registry import Registry
from aigc.serve.resolver import check_servable

__all__ = ["ModelChoice", "resolve_model_ref"]


@dataclass(frozen=True)
class ModelChoice:
    """A model as the actors load it: the label the user gave, the exact version, and the adapter to load."""

    label: str  # as given: base, support, support:v2, support:stable
    version: str  # the base model's id, or name:vN
    adapter_uri: str | None  # the registered weights (a directory or URI); None = the base model


def resolve_model_ref(cfg: PlatformConfig, ref: str, key: str = "generate.model") -> ModelChoice:
    """``ref`` resolved against ``cfg.registry_dir``.

    Raises:
        ConfigError: naming ``key``: the model is not registered, or was trained on another base model.
    """
    base_id = model_id_for(cfg.model.name_or_path)
    if ref == BASE_MODEL:
        return ModelChoice(ref, base_id, None)
    registry = Registry(cfg.registry_dir)
    try:
        entry = registry.resolve(ref.replace("@", ":", 1))
    except RegistryError as exc:
        raise ConfigError(f"{key}={ref!r}: {exc}") from None
    try:
        check_servable(entry, base_id)  # the server's own rule: a LoRA adapter of this base model
    except InvalidRequestError as exc:
        raise ConfigError(f"{key}={ref!r}: {exc}") from None
    return ModelChoice(ref, entry.model_id, entry.adapter_uri)

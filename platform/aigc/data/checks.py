"""What ``aigc preprocess`` checks before any Ray work: every source exists and fits its format, and the model's
tokenizer can be had and its context holds ``data.max_length``."""

from __future__ import annotations

from aigc.config import PlatformConfig
from aigc.data.reading import check_columns, list_input_files
from aigc.errors import ConfigError
from aigc.models.hub import resolve_model
from aigc.models.loading import context_length

__all__ = ["check", "check_max_length"]


def check_max_length(cfg: PlatformConfig) -> None:
    """``data.max_length`` must fit the context of ``cfg.model`` (resolved), when its config says it."""
    ctx = context_length(cfg.model.load_path())
    if ctx is not None and cfg.data.max_length > ctx:
        raise ConfigError(
            f"data.max_length: {cfg.data.max_length} is longer than the context of {cfg.model.name_or_path} "
            f"({ctx} tokens); set data.max_length={ctx} or less"
        )


def check(cfg: PlatformConfig) -> PlatformConfig:
    """Check what preprocessing reads; returns ``cfg`` with its model resolved (tokenizer and config only).

    Raises:
        DataError: a source names no file, or a file lacks the columns of its format.
        ModelUnavailableError: the tokenizer cannot be had (offline, gated, no such revision).
        ConfigError: ``data.max_length`` longer than the model's context.
    """
    check_columns(list_input_files(cfg.data), cfg.data)
    cfg = cfg.model_copy(update={"model": resolve_model(cfg.model, weights=False)})
    check_max_length(cfg)
    return cfg

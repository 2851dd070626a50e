"""What ``aigc serve`` checks before any Ray work: no public address without keys, and a token cap that leaves
room for a prompt in the model's context."""

from __future__ import annotations

from aigc.config import PlatformConfig
from aigc.errors import ConfigError
from aigc.models.hub import resolve_model
from aigc.models.loading import context_length
from aigc.serve.auth import check_exposure

__all__ = ["check"]


def check(cfg: PlatformConfig) -> PlatformConfig:
    """Check a deployment; returns ``cfg`` with its model resolved (tokenizer and config only).

    Raises:
        ConfigError: a non-loopback ``serve.host`` without API keys, or ``serve.max_tokens_cap`` at or above
            the model's context.
        ModelUnavailableError: the model cannot be had.
    """
    s = cfg.serve
    check_exposure(s.host, s.auth, s.api_keys_file, s.api_keys_env)
    cfg = cfg.model_copy(update={"model": resolve_model(cfg.model, weights=False)})
    ctx = context_length(cfg.model.load_path())
    if ctx is not None and s.max_tokens_cap >= ctx:
        raise ConfigError(
            f"serve.max_tokens_cap: {s.max_tokens_cap} leaves no room for a prompt in the context of "
            f"{cfg.model.name_or_path} ({ctx} tokens); set it below {ctx}"
        )
    return cfg

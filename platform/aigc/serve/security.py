"""The HTTP guard of the OpenAI app: CORS, then the API key, then the body size cap, then the routes.

:func:`install_guard` adds the three ASGI middlewares to the FastAPI app once, at import. Their settings are
per deployment, so each middleware asks ``current()`` per request for the :class:`HttpGuard` of the replica it
runs in; the ingress builds that guard in its constructor, which is where the API keys are read (in the
replica's environment and on its node, never in the driver).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aigc.serve.auth import ApiKeys, AuthMode, BearerAuth, resolve_api_keys
from aigc.serve.limits import DEFAULT_MAX_REQUEST_BYTES, BodyLimit, ConfiguredCORS

if TYPE_CHECKING:
    from aigc.config import ServeConfig

__all__ = ["GuardConfig", "HttpGuard", "install_guard"]


@dataclass(frozen=True)
class GuardConfig:
    """What the guard needs from ``serve.*``: key sources (never keys), the body cap, CORS origins."""

    auth: AuthMode = "auto"
    api_keys_file: str | None = None
    api_keys_env: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def of(cls, s: ServeConfig) -> GuardConfig:
        """The guard's part of the ``serve`` config section."""
        return cls(s.auth, s.api_keys_file, s.api_keys_env, s.max_request_bytes, tuple(s.cors_origins))


class HttpGuard:
    """One replica's guard settings, with its API keys loaded (None = requests are not authenticated).

    Raises:
        aigc.errors.ConfigError: a configured key source is missing, malformed or empty.
    """

    def __init__(self, cfg: GuardConfig):
        self.config = cfg
        self.keys: ApiKeys | None = resolve_api_keys(cfg.auth, cfg.api_keys_file, cfg.api_keys_env)
        # auto without keys: loopback clients only, even when the proxy listens on 0.0.0.0
        self.local_only = cfg.auth == "auto" and self.keys is None


def install_guard(app: Any, current: Callable[[], HttpGuard]) -> None:
    """Add the guard's middlewares to ``app`` (a FastAPI/Starlette app); the last added runs first."""
    app.add_middleware(BodyLimit, max_bytes=lambda: current().config.max_request_bytes)
    app.add_middleware(BearerAuth, keys=lambda: current().keys, local_only=lambda: current().local_only)
    app.add_middleware(ConfiguredCORS, origins=lambda: current().config.cors_origins)

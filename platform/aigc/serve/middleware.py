"""The HTTP middleware of the OpenAI app: CORS, then the API key, then the body size cap, then the routes.

:func:`install_guard` adds the three ASGI middlewares to the FastAPI app once, at import. Their settings are
per deployment, so each middleware asks ``current()`` per request for the :class:`HttpGuard` of the replica it
runs in; the ingress builds that guard in its constructor from the ``serve`` config section, which is where the
API keys are read (in the replica's environment and on its node, never in the driver; the keys themselves and
how they are parsed are :mod:`aigc.serve.auth`).

The body cap is checked before the body is parsed: a ``Content-Length`` above it is refused at once, and a
body sent without one (chunked) is read only up to the cap. The prompt-token cap needs the tokenizer, so the
engine enforces it (:class:`aigc.serve.engine.GenerationEngine`'s ``max_prompt_tokens``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware

from aigc.config import ServeConfig
from aigc.serve.auth import ApiKeys, KeyStore, check_exposure, is_loopback
from aigc.serve.keys import KeyPolicy, format_time
from aigc.serve.responses import error_body

__all__ = ["BearerAuth", "BodyLimit", "ConfiguredCORS", "HttpGuard", "install_guard", "key_name_of"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_OPEN_PATHS = frozenset({"/healthz"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_MISSING_KEY = "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' (the openai client's api_key)."
_LOCAL_ONLY = (
    "this server has no API keys configured, so it answers only clients on its own machine; configure "
    "serve.api_keys_file or serve.api_keys_env"
)
# A request relayed by a proxy on this machine (nginx, a sidecar, kubectl port-forward) comes from a loopback
# peer: its real client is elsewhere. Any of these headers means "not local".
_FORWARDING = (b"x-forwarded-for", b"forwarded", b"x-real-ip")


def key_name_of(request: Request) -> str | None:
    """The name of the API key that sent ``request`` (the auth middleware's ``request.state.key_name``)."""
    return getattr(request.state, "key_name", None)


class HttpGuard:
    """One replica's guard settings from the ``serve`` section, with its API keys loaded (:attr:`keys`: None =
    requests are not authenticated), re-read from the keys file when it changes.

    Args:
        s: the ``serve`` section.
        proxy_host: the address Serve's HTTP proxy really binds (``http_options.host``, which a Serve YAML sets
            whatever ``serve.host`` says); None = not known (only ``serve.host`` was checked).

    Raises:
        aigc.errors.ConfigError: a configured key source is missing, malformed or empty; or the proxy binds an
            address other machines reach and no key source is configured (``auth: auto``).
    """

    def __init__(self, s: ServeConfig, proxy_host: str | None = None):
        if proxy_host is not None:
            what = "the Serve HTTP proxy's bind address (http_options.host)"
            check_exposure(proxy_host, s.auth, s.api_keys_file, s.api_keys_env, what=what)
        self.store = KeyStore(s.auth, s.api_keys_file, s.api_keys_env, reload_s=s.api_keys_reload_s)
        # auto without keys: loopback clients only, even when the proxy listens on 0.0.0.0
        self.local_only = s.auth == "auto" and self.store.current() is None
        self.max_request_bytes = s.max_request_bytes
        self.cors_origins = tuple(s.cors_origins)

    @property
    def keys(self) -> ApiKeys | None:
        """The keys in force now (the keys file is re-read when it changed, see :class:`KeyStore`)."""
        return self.store.current()

    def policy(self, key_name: str | None) -> KeyPolicy:
        """The policy of the caller's key (no limits without keys)."""
        keys = self.keys
        return keys.policy(key_name) if keys is not None else KeyPolicy()


def install_guard(app: Any, current: Callable[[], HttpGuard]) -> None:
    """Add the guard's middlewares to ``app`` (a FastAPI/Starlette app); the last added runs first."""
    app.add_middleware(BodyLimit, max_bytes=lambda: current().max_request_bytes)
    app.add_middleware(BearerAuth, keys=lambda: current().keys, local_only=lambda: current().local_only)
    app.add_middleware(ConfiguredCORS, origins=lambda: current().cors_origins)


# ------------------------------------------------------------------------------------------------ API keys
class BearerAuth:
    """ASGI middleware: every HTTP request but ``/healthz`` needs ``Authorization: Bearer <key>``.

    ``keys`` is called per request (the ingress replica's keys, loaded when it starts); None = no check.
    ``local_only`` (``auto`` without keys) answers only clients on this machine, whatever address the HTTP
    proxy listens on: others, and every request carrying a forwarding header (``X-Forwarded-For``,
    ``Forwarded``, ``X-Real-IP``: a proxy on this machine relaying a remote client), get a 403 saying to
    configure keys.
    A missing or wrong key gets OpenAI's 401 (``invalid_api_key``) with ``WWW-Authenticate: Bearer``, an expired
    one a 401 saying so (``expired_api_key``); a valid one puts its name in ``scope["state"]["key_name"]``
    (``request.state.key_name``).
    """

    def __init__(self, app: ASGIApp, keys: Callable[[], ApiKeys | None], local_only: Callable[[], bool] = bool):
        self.app, self._keys, self._local_only = app, keys, local_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _route_path(scope) in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        if self._local_only() and not _is_local(scope):
            return await _refuse(403, error_body(_LOCAL_ONLY, code="local_clients_only"), scope, send)
        keys = self._keys()
        name = None
        if keys is not None:
            token = _bearer(scope)
            record = keys.record(token) if token else None
            headers = {"WWW-Authenticate": "Bearer"}
            if record is None:
                msg = "Incorrect API key provided." if token else _MISSING_KEY
                return await _refuse(401, error_body(msg, code="invalid_api_key"), scope, send, headers)
            if record.policy.expired(time.time()):
                msg = (f"The API key '{record.name}' expired at {format_time(record.policy.expires)}; ask for a "
                       "new key (aigc keys add).")  # fmt: skip
                return await _refuse(401, error_body(msg, code="expired_api_key"), scope, send, headers)
            name = record.name
        scope["state"] = {**(scope.get("state") or {}), "key_name": name}
        await self.app(scope, receive, send)


def _is_local(scope: Scope) -> bool:
    """A loopback peer that is not relaying for anyone (no forwarding header)."""
    if any(_header(scope, h) is not None for h in _FORWARDING):
        return False
    return is_loopback((scope.get("client") or ("",))[0])


def _route_path(scope: Scope) -> str:
    """The path inside the app: an app deployed under a route prefix (`/tight`) sees `/tight/healthz`."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _bearer(scope: Scope) -> str | None:
    value = _header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


# ------------------------------------------------------------------------------------------- body size cap
class BodyLimit:
    """ASGI middleware: a request body larger than ``max_bytes()`` gets OpenAI's error shape with a 413.

    The accepted body (at most the cap) is buffered and handed on in one piece; later ``receive`` calls (a
    streaming response listening for the client to leave) go to the server as usual.
    """

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int]):
        self.app, self._max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in _BODY_METHODS:
            return await self.app(scope, receive, send)
        limit = self._max_bytes()
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            return await _too_large(limit, scope, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # the client left before sending its body
                return
            body += message.get("body", b"")
            if len(body) > limit:
                return await _too_large(limit, scope, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


async def _too_large(limit: int, scope: Scope, send: Send) -> None:
    msg = f"the request body is larger than this server's limit of {limit} bytes (serve.max_request_bytes)"
    await _refuse(413, error_body(msg, code="request_too_large"), scope, send, {"Connection": "close"})


# ---------------------------------------------------------------------------------------------------- CORS
class ConfiguredCORS:
    """ASGI middleware: Starlette's ``CORSMiddleware`` for exactly ``origins()``; no CORS headers when empty.

    Browsers then refuse cross-origin pages the API's answers unless their origin is listed. Preflight
    requests (``OPTIONS``, which carry no API key) are answered here, before the key check.
    """

    def __init__(self, app: ASGIApp, origins: Callable[[], Sequence[str]]):
        self.app, self._origins = app, origins
        self._cors: dict[tuple[str, ...], ASGIApp] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan events run before the replica's guard exists
            return await self.app(scope, receive, send)
        origins = tuple(self._origins())
        if not origins:
            return await self.app(scope, receive, send)
        if origins not in self._cors:
            self._cors[origins] = CORSMiddleware(
                self.app,
                allow_origins=list(origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        await self._cors[origins](scope, receive, send)


# ------------------------------------------------------------------------------------------ shared helpers
def _header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case, as ASGI gives them), or None."""
    for key, value in scope.get("headers") or ():
        if key == name:
            return value
    return None


async def _refuse(
    status: int, body: dict[str, Any], scope: Scope, send: Send, headers: dict[str, str] | None = None
) -> None:
    """Answer the request here with an OpenAI-shaped error, without reading its body."""
    await JSONResponse(body, status_code=status, headers=headers)(scope, _no_receive, send)


async def _no_receive() -> MutableMapping[str, Any]:  # a JSONResponse never reads the request
    return {"type": "http.disconnect"}

"""Request limits in front of the routes: the body size cap, and CORS only for the configured origins.

The body cap is checked before the body is parsed: a ``Content-Length`` above it is refused at once, and a
body sent without one (chunked) is read only up to the cap. The prompt-token cap needs the tokenizer, so the
engine enforces it (:class:`aigc.serve.engine.GenerationEngine`'s ``max_prompt_tokens``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from aigc.serve.auth import ASGIApp, Receive, Scope, Send

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "BodyLimit", "ConfiguredCORS"]

DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB: a long conversation is a few hundred KiB at most
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


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
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(limit: int, scope: Scope, send: Send) -> None:
    from fastapi.responses import JSONResponse

    from aigc.serve.schemas import error_body

    msg = f"the request body is larger than this server's limit of {limit} bytes (serve.max_request_bytes)"
    resp = JSONResponse(error_body(msg, code="request_too_large"), status_code=413, headers={"Connection": "close"})
    await resp(scope, _no_receive, send)


async def _no_receive() -> dict[str, Any]:  # a JSONResponse never reads the request
    return {"type": "http.disconnect"}


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
            from starlette.middleware.cors import CORSMiddleware

            self._cors[origins] = CORSMiddleware(
                self.app,
                allow_origins=list(origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        await self._cors[origins](scope, receive, send)

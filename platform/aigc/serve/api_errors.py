"""Where errors become HTTP answers: every error an OpenAI-shaped JSON body with the right status.

:func:`api_error_from` maps platform errors (and Ray's wrappers around them) to statuses; a 500 never carries
exception text or paths: the details go to the server log under a request id the client can quote.
:func:`install_error_handlers` registers the mapping on a FastAPI app.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigc.errors import (
    AdapterLoadError,
    GenerationError,
    InvalidRequestError,
    ModelNotFoundError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from aigc.serve.responses import error_body

__all__ = ["ApiError", "api_error_from", "install_error_handlers"]

logger = logging.getLogger("ray.serve")


class ApiError(Exception):
    """Raised in a route; rendered as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        message, param = _utf8(message), None if param is None else _utf8(param)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers  # e.g. a 429's Retry-After and x-ratelimit-*

    def response(self) -> JSONResponse:
        body = error_body(self.message, self.type, self.param, self.code)
        headers = self.headers or ({"Retry-After": "1"} if self.status == 503 else None)
        return JSONResponse(status_code=self.status, content=body, headers=headers)


class RateLimitedError(ApiError):
    """OpenAI's 429 ``rate_limit_exceeded``: ``Retry-After`` in whole seconds (rounded up, at least 1), and any
    other headers the limit sends (``x-ratelimit-*``). ``type`` is ``requests`` or ``tokens``."""

    def __init__(self, message: str, retry_after_s: float, type: str = "requests",
                 headers: dict[str, str] | None = None):  # fmt: skip
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(429, message, type=type, code="rate_limit_exceeded",
                         headers={"Retry-After": str(self.retry_after_s), **(headers or {})})  # fmt: skip


def _utf8(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udXXX``: a message quoting what a client sent (a model id
    from JSON's ``"\\ud800"``) must still encode as UTF-8, or the error response itself fails to render."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def api_error_from(exc: BaseException, model: str | None = None) -> ApiError:
    """Map an exception from the Generator (Ray wraps it; ``.cause`` is the original) to an API error.

    Args:
        exc: the exception a route or the Generator raised.
        model: the model the request asked for, named in a failed load's message.
    """
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, ApiError):
        return cause
    if isinstance(cause, InvalidRequestError):
        return ApiError(400, cause.message, param=cause.param, code=cause.code)
    if isinstance(cause, ModelNotFoundError):
        return ApiError(404, cause.message, param="model", code="model_not_found")
    if isinstance(cause, BackPressureError):
        return ApiError(503, "the server is overloaded; retry shortly", type="server_error", code="overloaded")
    if isinstance(cause, ServiceUnavailableError):
        return ApiError(503, cause.message, type="server_error", code=cause.code or "unavailable")
    if isinstance(exc, RayActorError) or isinstance(cause, RayActorError):
        logger.warning("a generator replica was lost during a request for %s: %s", model, type(cause).__name__)
        msg = "the server replica handling this request was lost; retry the request"
        return ApiError(503, msg, type="server_error", code="replica_unavailable")
    if isinstance(cause, RequestTimeoutError):
        return ApiError(504, cause.message, type="server_error", code=cause.code or "request_timeout")
    # 500s: the details (paths, exception text) go to the server log only, under an id the client can quote.
    ref = uuid.uuid4().hex[:12]
    logger.error("request %s failed (model %s)", ref, model, exc_info=exc)
    if isinstance(cause, GenerationError):  # its message is ours and names no path
        msg = f"{cause.message}; see the server log (request id {ref})"
        return ApiError(500, msg, type="server_error", code=cause.code or "generation_failed")
    if isinstance(cause, AdapterLoadError):
        what = f"the model '{model}'" if model else "the model"
        msg = f"{what} could not be loaded on this server; see the server log (request id {ref})"
        return ApiError(500, msg, type="server_error", code="adapter_load_failed")
    return ApiError(500, f"internal error; see the server log (request id {ref})", type="server_error")


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # OpenAI answers schema errors with 400 (FastAPI's default is 422) and names the field in `param`.
    err = exc.errors()[0]
    kind = err.get("type")
    if kind == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON ({reason})").response()
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if not loc:  # the body as a whole
        if kind == "missing":
            msg = "the request body is missing: send a JSON object"
        elif isinstance(err.get("input"), (bytes, str)):
            msg = "the request body must be JSON, sent with Content-Type: application/json"
        else:
            msg = "the request body must be a JSON object"
        return ApiError(400, msg).response()
    param = ".".join(loc)
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return ApiError(400, f"{param}: {msg}", param=param).response()


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    msg = f"{exc.detail}: {request.method} {request.url.path}"
    return ApiError(exc.status_code, msg, type=kind).response()


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    return api_error_from(exc).response()


def install_error_handlers(app: Any) -> None:
    """Answer every error on ``app`` in OpenAI's shape (see the module doc)."""
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)

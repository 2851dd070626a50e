"""The endpoint's own Prometheus metrics, through Ray's metrics API (next to Serve's on Ray's metrics endpoint).

Ray exports every metric with a ``ray_`` prefix on each node's metrics port (``ray start
--metrics-export-port``; Prometheus discovers it through Ray's service-discovery file). Series:

- ``ray_aigc_requests_total{route, model, status, key}``: every API request; ``route`` is one of the app's
  routes or ``other`` (never a path a client made up: series stay bounded), ``key`` the API key's name
  (``-`` when the endpoint runs without keys), ``model`` the resolved model (``-`` before it is known).
- ``ray_aigc_request_latency_seconds{route, model}``: until the response starts (whole answer, or stream open).
- ``ray_aigc_prompt_tokens_total{model}``, ``ray_aigc_completion_tokens_total{model}``.
- ``ray_aigc_time_to_first_token_seconds{model}``, ``ray_aigc_time_per_output_token_seconds{model}``.
- ``ray_aigc_key_tokens_total{key, kind}``: tokens per API key name, ``kind`` ``prompt`` or ``completion``.
- ``ray_aigc_rate_limited_total{key, type}``: requests refused with 429 (``type``: ``requests`` or ``tokens``).
- ``ray_aigc_limiter_fallback_total``: requests whose limits a replica decided alone (the counter actor was
  unreachable, :mod:`aigc.serve.quota`).
- ``ray_aigc_content_filter_total{where, category}``: prompts refused and answers stopped by the content policy.
- per generator replica: ``ray_aigc_batch_rows`` (requests decoding now), ``ray_aigc_batch_capacity``
  (``serve.max_batch_size``), ``ray_aigc_queue_depth`` (waiting for a batch slot), ``ray_aigc_adapters_loaded``,
  ``ray_aigc_max_replicas`` (``serve.autoscaling.max_replicas``, for the "at the ceiling" alert).

Metric objects are created on first use in the process that records them (an ingress or generator replica).
"""

from __future__ import annotations

import contextvars
import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from starlette.routing import Match

from aigc.serve.engine.protocol import ServingEngine

__all__ = ["MetricsMiddleware", "ingress_metrics", "request_info", "start_generator_gauges"]

_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_TOKEN_TIME_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]

# The request being served (set by the middleware, filled in by the route: model, key name).
_REQUEST: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("aigc_request", default=None)


def request_info() -> dict[str, Any]:
    """This request's labels, for the route to fill in (``model``, ``key``); a throwaway dict outside a request."""
    info = _REQUEST.get()
    return info if info is not None else {}


class _IngressMetrics:
    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        self.requests = Counter(
            "aigc_requests_total", "API requests by route, model, status and API key name.",
            tag_keys=("route", "model", "status", "key"),
        )  # fmt: skip
        self.latency = Histogram(
            "aigc_request_latency_seconds", "Time until the response starts.", _LATENCY_BUCKETS,
            tag_keys=("route", "model"),
        )  # fmt: skip
        self.prompt_tokens = Counter("aigc_prompt_tokens_total", "Prompt tokens.", tag_keys=("model",))
        self.completion_tokens = Counter("aigc_completion_tokens_total", "Generated tokens.", tag_keys=("model",))
        self.ttft = Histogram(
            "aigc_time_to_first_token_seconds", "Time to the first streamed text.", _LATENCY_BUCKETS,
            tag_keys=("model",),
        )  # fmt: skip
        self.tpot = Histogram(
            "aigc_time_per_output_token_seconds", "Generation time per output token after the first.",
            _TOKEN_TIME_BUCKETS, tag_keys=("model",),
        )  # fmt: skip
        self.key_tokens = Counter(
            "aigc_key_tokens_total", "Tokens per API key name (prompt or completion).", tag_keys=("key", "kind"),
        )  # fmt: skip
        self.limited = Counter(
            "aigc_rate_limited_total", "Requests refused with 429 per API key name and limit type.",
            tag_keys=("key", "type"),
        )  # fmt: skip
        self.fallback = Counter(
            "aigc_limiter_fallback_total", "Requests whose limits one ingress replica decided (counter unreachable).",
        )  # fmt: skip
        self.flagged = Counter(
            "aigc_content_filter_total", "Prompts refused / answers stopped by the content policy.",
            tag_keys=("where", "category"),
        )  # fmt: skip

    def key_usage(self, key: str, prompt_tokens: int, completion_tokens: int) -> None:
        for kind, n in (("prompt", prompt_tokens), ("completion", completion_tokens)):
            if n:
                self.key_tokens.inc(n, tags={"key": key, "kind": kind})

    def rate_limited(self, key: str, kind: str) -> None:
        self.limited.inc(1, tags={"key": key, "type": kind})

    def limiter_fallback(self) -> None:
        self.fallback.inc(1)

    def usage(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        tags = {"model": model}
        self.prompt_tokens.inc(prompt_tokens, tags=tags)
        if completion_tokens:
            self.completion_tokens.inc(completion_tokens, tags=tags)

    def timing(self, model: str, first_s: float, total_s: float, completion_tokens: int) -> None:
        tags = {"model": model}
        self.ttft.observe(first_s, tags=tags)
        if completion_tokens > 1:
            self.tpot.observe(max(0.0, total_s - first_s) / (completion_tokens - 1), tags=tags)

    def content_filter(self, where: str, category: str) -> None:
        self.flagged.inc(1, tags={"where": where, "category": category})


@functools.cache
def ingress_metrics() -> _IngressMetrics:
    """The ingress replica's metric objects (created once per process)."""
    return _IngressMetrics()


class MetricsMiddleware:
    """ASGI middleware: counts every ``/v1/`` request by route, model, status and key, and times it.

    Args:
        app: the ASGI app it wraps.
        record: ``(route, model, status, key, seconds)`` -> None; defaults to the ingress metrics.
        bounded: label a request with the template of the app route it matches (read from ``scope["app"]``,
            the app instance that really runs: Serve deploys a copy of the module's app), and any other path
            ``other``, so unauthenticated clients cannot create new series. False = every path as is.
    """

    def __init__(self, app: Any, record: Callable[..., None] | None = None, bounded: bool = True):
        self.app, self._record, self._bounded = app, record, bounded

    def _route(self, scope: dict) -> str:
        if not self._bounded:
            return scope["path"]
        probe = {**scope, "type": "http"}
        for route in _leaf_routes(getattr(scope.get("app"), "routes", ())):
            if route.matches(probe)[0] != Match.NONE:
                return route.path
        return "other"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        info: dict[str, Any] = {}
        token = _REQUEST.set(info)
        t0, status = time.perf_counter(), 500

        async def watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                info["elapsed"] = time.perf_counter() - t0
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            _REQUEST.reset(token)
            elapsed = info.get("elapsed", time.perf_counter() - t0)
            route = self._route(scope)
            # The API key's name: from the route, or from request.state.key_name (Starlette keeps it in the scope).
            key = info.get("key") or (scope.get("state") or {}).get("key_name") or "-"
            (self._record or _record_request)(route, info.get("model", "-"), status, key, elapsed)


def _leaf_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """The routes with a path template, routers included by ``serve.ingress`` (FastAPI's ``include_router``) opened."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _leaf_routes(included.routes)
        elif getattr(route, "path", None):
            yield route


def _record_request(route: str, model: str, status: int, key: str, seconds: float) -> None:
    m = ingress_metrics()
    m.requests.inc(1, tags={"route": route, "model": model, "status": str(status), "key": key})
    m.latency.observe(seconds, tags={"route": route, "model": model})


def start_generator_gauges(engine: ServingEngine, max_replicas: int, period_s: float = 1.0) -> threading.Event:
    """Publish the engine's batch and queue state every ``period_s`` from a thread; set the event to stop."""
    from ray.util.metrics import Gauge

    gauges = {
        "aigc_batch_rows": ("Requests decoding in this replica's batch now.", lambda: engine.active_rows),
        "aigc_batch_capacity": ("Rows one batch can hold (serve.max_batch_size).", lambda: engine.max_batch_size),
        "aigc_queue_depth": ("Requests in this replica waiting for a batch slot.", lambda: engine.waiting_requests),
        "aigc_adapters_loaded": ("LoRA adapters loaded in this replica.", lambda: len(engine.adapters)),
        "aigc_max_replicas": ("The replica ceiling (serve.autoscaling.max_replicas).", lambda: max_replicas),
    }
    live = [(Gauge(name, description), read) for name, (description, read) in gauges.items()]
    stop = threading.Event()

    def loop() -> None:
        while True:
            for gauge, read in live:
                gauge.set(read())
            if stop.wait(period_s):
                return

    threading.Thread(target=loop, name="aigc-gauges", daemon=True).start()
    return stop

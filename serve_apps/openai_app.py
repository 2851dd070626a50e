"""OpenAI-compatible serving of a base model and every LoRA adapter in the registry.

Two deployments:

* ``Generator`` (autoscaling): holds a :class:`~aigc.serve.engine.GenerationEngine`. Adapters are loaded
  per replica on first use through ``@serve.multiplexed`` (LRU, ``serve.max_adapters_per_replica``), so a
  newly registered adapter version is served without a redeploy, and Serve routes a request for an adapter
  to a replica that already holds it.
* ``OpenAIIngress`` (FastAPI): ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
  (``stream: true`` -> server-sent events), ``GET /healthz``. It validates requests, resolves the model id
  against the registry and calls the Generator with ``multiplexed_model_id`` = the resolved ``name:vN``.
  Every error is an OpenAI-shaped JSON body.

Run it: ``serve run serve_apps/openai.yaml`` (see :func:`build_app`), or ``aigc serve --config ...``.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime, and Serve's
# class-based routes do not resolve string annotations (a body model would become a query parameter).
import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigc.config import PlatformConfig, load_config
from aigc.models.loading import model_id_for, resolve_local_path
from aigc.registry import Registry, RegistryError
from aigc.serve.engine import (
    AdapterLoadError,
    Completion,
    Delta,
    GenerationEngine,
    InvalidRequestError,
    ModelNotFoundError,
    Prompt,
    SamplingParams,
)
from aigc.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    error_body,
    new_id,
)

__all__ = ["Generator", "OpenAIIngress", "build_app", "build_app_from_config"]

logger = logging.getLogger("ray.serve")

# The ingress only parses JSON and relays tokens: a fraction of a CPU, and room for many open streams
# (Serve's default of 5 ongoing requests per replica would queue streams behind each other).
_INGRESS_CPUS = 0.1
_INGRESS_MAX_ONGOING = 256
_MAX_LISTED_IN_ERRORS = 20


# ============================================================================================ Generator
class LoadedAdapter:
    """What the multiplexed loader returns: one registry version loaded into the engine as ``name``.

    Serve calls ``__del__`` (in a thread) when it evicts the adapter from the replica's LRU cache; the
    garbage collector may call it again later, so unloading is idempotent.
    """

    def __init__(self, engine: GenerationEngine, name: str, model_id: str):
        self.engine, self.name, self.model_id = engine, name, model_id
        self._unloaded = False

    def unload(self) -> None:
        if self._unloaded:
            return
        self._unloaded = True
        try:
            self.engine.delete_adapter(self.name)
        except Exception:  # never fail Serve's eviction (it would fail the load that triggered it)
            logger.exception("failed to unload adapter %s (%s)", self.name, self.model_id)

    def __del__(self) -> None:
        self.unload()


@serve.deployment(name="Generator")
class Generator:
    """A replica holding the base model and up to ``max_adapters`` LoRA adapters (LRU).

    Requests for the base model carry no multiplexed model id; any other id is a registry ``name:vN``.

    Args:
        model_name_or_path: hub id or local directory of the base model.
        registry_dir: the adapter registry (local directory or ``s3://`` / ``gs://`` URI).
        base_model_id: the id clients use for the base model.
        dtype: weights dtype (``auto`` = float32 on CPU, bf16/fp16 on GPU).
        trust_remote_code: allow custom modelling code from the hub.
        max_adapters: adapters kept loaded per replica; the least recently used is evicted beyond this.
    """

    def __init__(
        self,
        model_name_or_path: str,
        registry_dir: str,
        base_model_id: str,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        max_adapters: int = 4,
    ):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray hides GPUs from a num_gpus=0 replica
        self._engine = GenerationEngine(
            model_name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        self._registry = Registry(registry_dir)
        self._base_model_id = base_model_id
        self._load_counter = itertools.count()

        # max_adapters comes from config, so the multiplexed loader is wrapped here rather than with a
        # decorator on the class (as ray.serve.llm's LLMServer does). Serve keeps the LRU cache on it.
        async def get_adapter(model_id: str) -> LoadedAdapter:
            return await self._load_adapter(model_id)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(get_adapter)

    async def _load_adapter(self, model_id: str) -> LoadedAdapter:
        try:
            entry = await asyncio.to_thread(self._registry.resolve, model_id)
        except RegistryError as exc:
            raise ModelNotFoundError(str(exc), param="model", code="model_not_found") from None
        if model_id_for(entry.base_model) != self._engine.model_id:
            logger.warning(
                "adapter %s was trained on %s, this replica serves %s",
                entry.model_id,
                entry.base_model,
                self._engine.model_name_or_path,
            )
        path = await asyncio.to_thread(self._registry.local_adapter_dir, entry)
        # peft adapter names must be unique and free of '.', ':'; a reload after eviction gets a new name.
        name = f"{re.sub(r'[^A-Za-z0-9]', '_', entry.name)}_v{entry.version}_{next(self._load_counter)}"
        await asyncio.to_thread(self._engine.load_adapter, path, name)
        logger.info("loaded adapter %s as %s", entry.model_id, name)
        return LoadedAdapter(self._engine, name, entry.model_id)

    @contextlib.asynccontextmanager
    async def _adapter_for_request(self) -> AsyncIterator[str | None]:
        """The engine adapter name this request uses (None = base), held loaded until the request ends."""
        model_id = serve.get_multiplexed_model_id()
        if not model_id or model_id == self._base_model_id:
            yield None
            return
        # An adapter evicted between the cache lookup and acquire() is loaded again (new engine name).
        for _ in range(3):
            adapter = await self.get_adapter(model_id)
            if self._engine.acquire_adapter(adapter.name):
                break
        else:
            raise AdapterLoadError(f"adapter {model_id} kept being evicted while loading; retry the request")
        try:
            yield adapter.name
        finally:
            self._engine.release_adapter(adapter.name)

    async def complete(self, prompt: Prompt, params: SamplingParams) -> Completion:
        """A whole completion for the request's model (its multiplexed model id)."""
        async with self._adapter_for_request() as adapter:
            return await self._engine.agenerate(prompt, params, adapter=adapter)

    async def stream(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Delta]:
        """Text deltas for the request's model; call with ``handle.options(stream=True)``."""
        # aclosing: a cancelled request (client gone) closes the engine stream at once, which stops the model.
        async with (
            self._adapter_for_request() as adapter,
            contextlib.aclosing(self._engine.astream(prompt, params, adapter=adapter)) as deltas,
        ):
            async for delta in deltas:
                yield delta

    def loaded_adapters(self) -> list[str]:
        """Engine names of the adapters loaded in this replica (for tests and debugging)."""
        return self._engine.adapters


# ============================================================================================== Ingress
# A JSON body without a Content-Type header is parsed too (recent FastAPI is strict by default; older
# versions have no such option and always parse it).
_LENIENT = {"strict_content_type": False} if "strict_content_type" in inspect.signature(FastAPI).parameters else {}
app = FastAPI(title="AIGC Platform", description="OpenAI-compatible API for base models and LoRA adapters.", **_LENIENT)


class ApiError(Exception):
    """Raised in a route; rendered as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = error_body(self.message, self.type, self.param, self.code)
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(status_code=self.status, content=body, headers=headers)


def _api_error_from(exc: BaseException) -> ApiError:
    """Map an exception from the Generator (Ray wraps it; ``.cause`` is the original) to an API error."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, ApiError):
        return cause
    if isinstance(cause, InvalidRequestError):
        return ApiError(400, cause.message, param=cause.param, code=cause.code)
    if isinstance(cause, ModelNotFoundError):
        return ApiError(404, cause.message, param="model", code="model_not_found")
    if isinstance(cause, BackPressureError):
        return ApiError(503, "the server is overloaded; retry shortly", type="server_error", code="overloaded")
    if isinstance(cause, AdapterLoadError):
        return ApiError(500, cause.message, type="server_error", code="adapter_load_failed")
    logger.error("request failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(cause).__name__}: {cause}", type="server_error")


@app.exception_handler(ApiError)
async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


@app.exception_handler(RequestValidationError)
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


@app.exception_handler(StarletteHTTPException)
async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    msg = f"{exc.detail}: {request.method} {request.url.path}"
    return ApiError(exc.status_code, msg, type=kind).response()


@app.exception_handler(Exception)
async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    return _api_error_from(exc).response()


def _sse(payload: Any) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


@serve.deployment(name="OpenAIIngress", ray_actor_options={"num_cpus": _INGRESS_CPUS})
@serve.ingress(app)
class OpenAIIngress:
    """HTTP front: validation, model resolution, OpenAI shapes, SSE.

    Args:
        generator: handle to the ``Generator`` deployment.
        base_model_id: the id clients use for the base model.
        registry_dir: the adapter registry (local directory or URI).
        max_tokens_cap: the largest ``max_tokens`` a request may ask for.
        default_max_tokens: used when a request gives no ``max_tokens``.
    """

    def __init__(
        self,
        generator: DeploymentHandle,
        base_model_id: str,
        registry_dir: str,
        max_tokens_cap: int = 512,
        default_max_tokens: int = 64,
    ):
        self._generator = generator
        self._base_model_id = base_model_id
        self._registry = Registry(registry_dir)
        self._cap = max_tokens_cap
        self._default_max_tokens = min(default_max_tokens, max_tokens_cap)

    # 1. models -----------------------------------------------------------------------------------------
    async def _model_cards(self) -> list[ModelCard]:
        entries = await asyncio.to_thread(self._registry.list)
        cards = [ModelCard(id=self._base_model_id)]
        latest: dict[str, Any] = {}
        for e in entries:  # ascending versions: the last one seen per name is the latest
            latest[e.name] = e
        for name, e in sorted(latest.items()):
            cards.append(ModelCard(id=name, created=int(e.created_at), root=e.model_id, parent=e.base_model))
        for e in entries:
            cards.append(ModelCard(id=e.model_id, created=int(e.created_at), root=e.model_id, parent=e.base_model))
        return cards

    async def _resolve(self, model: str) -> str:
        """The multiplexed model id for ``model``: "" for the base model, else the registry's ``name:vN``."""
        if model == self._base_model_id:
            return ""
        try:
            entry = await asyncio.to_thread(self._registry.resolve, model)
        except RegistryError:
            ids = [c.id for c in await self._model_cards()]
            shown = ", ".join(ids[:_MAX_LISTED_IN_ERRORS]) + (" ..." if len(ids) > _MAX_LISTED_IN_ERRORS else "")
            raise ApiError(
                404,
                f"The model '{model}' does not exist. Available models: {shown}",
                param="model",
                code="model_not_found",
            ) from None
        return entry.model_id

    # 2. request -> params ------------------------------------------------------------------------------
    def _params(self, body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
        requested = body.requested_max_tokens
        if requested is None:
            max_tokens = self._default_max_tokens
        elif 1 <= requested <= self._cap:
            max_tokens = requested
        else:
            param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise ApiError(
                400,
                f"{param} must be between 1 and {self._cap} (this server's cap), got {requested}",
                param=param,
            )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=tuple(body.stop_list),
        )

    async def _complete(self, model_id: str, prompt: Prompt, params: SamplingParams) -> Completion:
        try:
            return await self._generator.options(multiplexed_model_id=model_id).complete.remote(prompt, params)
        except Exception as exc:
            raise _api_error_from(exc) from None

    async def _open_stream(self, model_id: str, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Delta]:
        """Start a streamed generation and wait for its first delta, so that errors (unknown adapter,
        prompt too long, overload) still become a proper status code instead of a broken stream."""
        gen = self._generator.options(multiplexed_model_id=model_id, stream=True).stream.remote(prompt, params)
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = None
        except asyncio.CancelledError:  # the client left before the first token
            gen.cancel()
            raise
        except Exception as exc:
            raise _api_error_from(exc) from None

        async def deltas() -> AsyncIterator[Delta]:
            try:
                if first is not None:
                    yield first
                    async for d in gen:
                        yield d
            finally:
                gen.cancel()  # no-op when finished; stops the replica's generation if the client left

        return deltas()

    @staticmethod
    def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for e in events:
                    yield e
            except Exception as exc:  # the status line is already sent: report in-band, as OpenAI does
                yield _sse(error_body(_api_error_from(exc).message, type="server_error"))
            yield _sse("[DONE]")

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    # 3. routes ----------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> Response:
        return JSONResponse({"status": "ok", "base_model": self._base_model_id})

    @app.get("/v1/models")
    async def list_models(self) -> Response:
        return JSONResponse(ModelList(data=await self._model_cards()).model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        model_id = await self._resolve(body.model)
        model_name = model_id or self._base_model_id
        params = self._params(body)
        messages = [m.as_template_dict() for m in body.messages]
        if not body.stream:
            out = await self._complete(model_id, messages, params)
            resp = ChatCompletionResponse(
                model=model_name,
                choices=[ChatChoice(message=AssistantMessage(content=out.text), finish_reason=out.finish_reason)],
                usage=Usage.of(out.prompt_tokens, out.completion_tokens),
            )
            return JSONResponse(resp.model_dump())

        deltas = await self._open_stream(model_id, messages, params)
        head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": model_name}

        async def events() -> AsyncIterator[str]:
            yield _sse(
                ChatCompletionChunk(
                    **head, choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))]
                ).model_dump()
            )
            async for d in deltas:
                if d.text:
                    chunk = ChatCompletionChunk(**head, choices=[ChatChunkChoice(delta=ChatDelta(content=d.text))])
                    yield _sse(chunk.model_dump())
                if d.finish_reason is not None:
                    last = ChatChunkChoice(delta=ChatDelta(), finish_reason=d.finish_reason)
                    yield _sse(ChatCompletionChunk(**head, choices=[last]).model_dump())
                    if body.include_usage:
                        usage = Usage.of(d.prompt_tokens, d.completion_tokens)
                        yield _sse(ChatCompletionChunk(**head, choices=[], usage=usage).model_dump())

        return self._event_stream(events())

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Response:
        model_id = await self._resolve(body.model)
        model_name = model_id or self._base_model_id
        params = self._params(body)
        if not body.stream:
            out = await self._complete(model_id, body.prompt_text, params)
            resp = CompletionResponse(
                model=model_name,
                choices=[CompletionChoice(text=out.text, finish_reason=out.finish_reason)],
                usage=Usage.of(out.prompt_tokens, out.completion_tokens),
            )
            return JSONResponse(resp.model_dump())

        deltas = await self._open_stream(model_id, body.prompt_text, params)
        head = {"id": new_id("cmpl"), "created": int(time.time()), "model": model_name}

        async def events() -> AsyncIterator[str]:
            async for d in deltas:
                if d.text:
                    yield _sse(CompletionChunk(**head, choices=[CompletionChoice(text=d.text)]).model_dump())
                if d.finish_reason is not None:
                    last = CompletionChoice(text="", finish_reason=d.finish_reason)
                    yield _sse(CompletionChunk(**head, choices=[last]).model_dump())
                    if body.include_usage:
                        usage = Usage.of(d.prompt_tokens, d.completion_tokens)
                        yield _sse(CompletionChunk(**head, choices=[], usage=usage).model_dump())

        return self._event_stream(events())


# ============================================================================================= builders
def _flatten(prefix: str, value: Any) -> list[str]:
    """``{"serve": {"port": 9000}}`` -> ``["serve.port=9000"]`` (values as JSON, which is valid YAML)."""
    if isinstance(value, dict) and value:
        return [o for k, v in value.items() for o in _flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    return [f"{prefix}={json.dumps(value)}"]


def _config_from_args(args: dict[str, Any]) -> PlatformConfig:
    args = dict(args or {})
    path = args.pop("config", None)
    overrides = list(args.pop("overrides", None) or [])
    # Inline sections go first, so explicit `overrides` win over them, as they win over the file.
    inline = _flatten("", args) if args else []
    return load_config(path, inline + overrides)


def build_app_from_config(cfg: PlatformConfig) -> serve.Application:
    """The OpenAI app for a platform config: its ``model``, ``registry_dir`` and ``serve`` sections."""
    s = cfg.serve
    base_model_id = s.base_model_id or model_id_for(cfg.model.name_or_path)
    registry_dir = resolve_local_path(cfg.registry_dir, is_local=True)  # may not exist before the first training
    generator = Generator.options(
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        autoscaling_config=s.autoscaling.model_dump(),
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
    ).bind(
        model_name_or_path=resolve_local_path(cfg.model.name_or_path),
        registry_dir=registry_dir,
        base_model_id=base_model_id,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        max_adapters=s.max_adapters_per_replica,
    )
    return OpenAIIngress.options(max_ongoing_requests=_INGRESS_MAX_ONGOING).bind(
        generator,
        base_model_id=base_model_id,
        registry_dir=registry_dir,
        max_tokens_cap=s.max_tokens_cap,
        default_max_tokens=s.default_max_tokens,
    )


def build_app(args: dict[str, Any]) -> serve.Application:
    """Build the OpenAI-compatible app from Serve config ``args``.

    ``args`` names a platform config file (plus optional ``section.key=value`` overrides), or gives its
    sections inline, or both (inline sections override the file, ``overrides`` override both)::

        # serve run serve_apps/openai.yaml   (or: serve deploy serve_apps/openai.yaml)
        applications:
          - name: aigc
            route_prefix: /
            import_path: serve_apps.openai_app:build_app
            args:
              config: configs/demo.yaml
              overrides: ["serve.max_tokens_cap=256"]
              # or inline, without a file:
              # model: {name_or_path: assets/tiny-base}
              # registry_dir: runs/registry
              # serve: {max_adapters_per_replica: 8, autoscaling: {max_replicas: 4}}

    Raises:
        aigc.config.ConfigError: the config is invalid; the message names the field.
    """
    return build_app_from_config(_config_from_args(args))

"""The ``OpenAIIngress`` deployment: the OpenAI-compatible HTTP front (FastAPI on Ray Serve).

``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true`` -> server-sent
events), ``GET /healthz``. It validates requests, resolves the model id against the registry per request
(an alias such as ``support-bot`` or ``support-bot:stable`` moves without a redeploy; answers are reused for
``serve.resolve_cache_s``, :mod:`aigc.serve.resolver`) and calls the ``Generator`` with
``multiplexed_model_id`` = the resolved ``name:vN``, which is also the response's ``model``. Errors become
HTTP statuses only in :mod:`aigc.serve.api_errors` (OpenAI-shaped bodies; a 500 never carries exception text
or paths); the response shapes of the two endpoints are in :mod:`aigc.serve.shapes`. Before any route, the guard
(:mod:`aigc.serve.security`: CORS, API keys, body cap) and the metrics middleware run; content safety is
:mod:`aigc.serve.moderation`. With ``serve.capture``, answers are stored under their ids and
``POST /v1/feedback`` rates them (:mod:`aigc.serve.feedback`).
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime, and Serve's
# class-based routes do not resolve string annotations (a body model would become a query parameter).
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from aigc.errors import RegistryError, StorageError
from aigc.feedback.store import FeedbackRequest, UnknownCompletionError
from aigc.registry import Registry
from aigc.serve.api_errors import ApiError, api_error_from, install_error_handlers
from aigc.serve.engine import Completion, Delta, Prompt, SamplingParams
from aigc.serve.feedback import FeedbackCapture
from aigc.serve.metrics import MetricsMiddleware, ingress_metrics, request_info
from aigc.serve.moderation import OutputGuard, load_policy
from aigc.serve.resolver import ModelResolver
from aigc.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
    error_body,
    new_id,
)
from aigc.serve.security import GuardConfig, HttpGuard, install_guard
from aigc.serve.shapes import CHAT, TEXT, FinishReason, Kind, sse

__all__ = ["OpenAIIngress", "app"]

logger = logging.getLogger("ray.serve")

# The ingress only parses JSON and relays tokens: a fraction of a CPU, and room for many open streams
# (Serve's default of 5 ongoing requests per replica would queue streams behind each other).
INGRESS_CPUS = 0.1
INGRESS_MAX_ONGOING = 256
_MAX_LISTED_IN_ERRORS = 20

# JSON bodies need `Content-Type: application/json` (FastAPI's default): a text/plain POST, which a browser page
# may send to any origin without a CORS preflight, is refused with a 400.
app = FastAPI(title="AIGC Platform", description="OpenAI-compatible API for base models and LoRA adapters.")


def _replica_guard() -> HttpGuard:
    """The guard of the ingress replica serving this request (its keys, body cap, CORS origins)."""
    return serve.get_replica_context().servable_object.guard


install_guard(app, _replica_guard)  # CORS -> API key -> body size cap, before any route or body parsing
app.add_middleware(MetricsMiddleware)  # outermost: counts every request, refused ones too
install_error_handlers(app)


@serve.deployment(name="OpenAIIngress", ray_actor_options={"num_cpus": INGRESS_CPUS})
@serve.ingress(app)
class OpenAIIngress:
    """HTTP front: validation, model resolution, OpenAI shapes, SSE.

    Args:
        generator: handle to the ``Generator`` deployment.
        base_model_id: the id clients use for the base model.
        registry_dir: the adapter registry (local directory or URI).
        max_tokens_cap: the largest ``max_tokens`` a request may ask for.
        default_max_tokens: used when a request gives no ``max_tokens``.
        moderation: ``serve.moderation`` as a dict (see :mod:`aigc.serve.moderation`); None = no checks.
        guard: API key sources, body size cap and CORS origins; the keys are read here, in the replica.
        feedback_dir: where completions are captured and feedback is kept; None = capture off.
        resolve_cache_s: seconds a model id's resolution is reused (an alias move is seen within this).
    """

    def __init__(
        self,
        generator: DeploymentHandle,
        base_model_id: str,
        registry_dir: str,
        max_tokens_cap: int = 512,
        default_max_tokens: int = 64,
        moderation: dict[str, Any] | None = None,
        guard: GuardConfig | None = None,
        feedback_dir: str | None = None,
        resolve_cache_s: float = 1.0,
    ):
        self.guard = HttpGuard(guard or GuardConfig())
        self._generator = generator
        self._base_model_id = base_model_id
        self._models = ModelResolver(Registry(registry_dir), ttl_s=resolve_cache_s)
        self._cap = max_tokens_cap
        self._default_max_tokens = min(default_max_tokens, max_tokens_cap)
        mod = moderation or {}
        self._policy = load_policy(mod.get("categories") or {}, mod.get("classifier"))
        self._check_prompts = self._policy is not None and mod.get("check_prompts", True)
        self._check_outputs = self._policy is not None and mod.get("check_outputs", True)
        self._holdback = int(mod.get("holdback_chars", 64))
        self._feedback = FeedbackCapture(feedback_dir) if feedback_dir else None

    # 1. models -----------------------------------------------------------------------------------------
    async def _model_cards(self) -> list[ModelCard]:
        """The base model; per name its bare name and its aliases (``root``: the version each serves now);
        then every version."""
        listing = await self._models.listing()
        cards = [ModelCard(id=self._base_model_id)]
        latest: dict[str, Any] = {}
        for e in listing.versions:  # ascending versions: the last one seen per name is the latest
            latest[e.name] = e
        targets = {a.model_id: a for a in listing.aliases}
        for name, e in sorted(latest.items()):
            bare = targets.get(name)
            root = bare.target if bare is not None else e.model_id
            cards.append(ModelCard(id=name, created=int(e.created_at), root=root, parent=e.base_model))
            for a in listing.aliases:
                if a.name == name and a.model_id != name:
                    cards.append(ModelCard(id=a.model_id, created=int(a.updated_at), root=a.target,
                                           parent=e.base_model))  # fmt: skip
        for e in listing.versions:
            cards.append(ModelCard(id=e.model_id, created=int(e.created_at), root=e.model_id, parent=e.base_model))
        return cards

    async def _resolve(self, model: str) -> str:
        """The multiplexed model id for ``model``: "" for the base model, else the registry's ``name:vN``."""
        if model == self._base_model_id:
            return ""
        try:
            entry = await self._models.resolve(model)
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
            raise api_error_from(exc, model_id or self._base_model_id) from None

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
            raise api_error_from(exc, model_id or self._base_model_id) from None

        async def deltas() -> AsyncIterator[Delta]:
            try:
                if first is not None:
                    yield first
                    async for d in gen:
                        yield d
            finally:
                gen.cancel()  # no-op when finished; stops the replica's generation if the client left

        return deltas()

    def _moderate_prompt(self, prompt: Prompt) -> None:
        """Refuse a prompt the content policy flags (400, ``code: content_filter``), before any generation."""
        if not self._check_prompts:
            return
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        flag = self._policy.check(text)
        if flag is not None:
            ingress_metrics().content_filter("prompt", flag.category)
            raise ApiError(
                400,
                f"the prompt was flagged by this server's content policy (category: {flag.category})",
                param="prompt" if isinstance(prompt, str) else "messages",
                code="content_filter",
            )

    def _moderate_answer(self, text: str, reason: FinishReason) -> tuple[str, FinishReason]:
        """A whole answer cut before its first flagged span, with ``finish_reason`` content_filter."""
        flag = self._policy.check(text) if self._check_outputs else None
        if flag is None:
            return text, reason
        ingress_metrics().content_filter("answer", flag.category)
        return text[: flag.start], "content_filter"

    @staticmethod
    def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for e in events:
                    yield e
            except Exception as exc:  # the status line is already sent: report in-band, as OpenAI does
                yield sse(error_body(api_error_from(exc).message, type="server_error"))
            yield sse("[DONE]")

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
        return await self._run_request(CHAT, body, [m.as_template_dict() for m in body.messages])

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Response:
        return await self._run_request(TEXT, body, body.prompt_text)

    @app.post("/v1/feedback")
    async def feedback(self, body: FeedbackRequest) -> Response:
        if self._feedback is None:
            raise ApiError(404, "feedback is off on this server (serve.capture: false)", code="feedback_disabled")
        try:
            rating = await self._feedback.submit(body)
        except UnknownCompletionError as exc:
            raise ApiError(404, exc.message, param="id", code="completion_not_found") from None
        except StorageError as exc:
            logger.error("feedback store unavailable: %s", exc)
            msg, code = "the feedback store is unavailable; retry later", "feedback_store_unavailable"
            raise ApiError(503, msg, type="server_error", code=code) from None
        return JSONResponse(rating.to_json())

    # 4. the one request path both endpoints share ------------------------------------------------------
    async def _run_request(
        self, kind: Kind, body: ChatCompletionRequest | CompletionRequest, prompt: Prompt
    ) -> Response:
        """Resolve the model, generate, and answer in ``kind``'s OpenAI shape (JSON, or SSE when streaming)."""
        model_id = await self._resolve(body.model)
        model_name = model_id or self._base_model_id
        request_info()["model"] = model_name  # a metrics label: only ids that exist, never what clients typed
        params = self._params(body)
        rid = new_id(kind.id_prefix)  # the id feedback refers to, streamed or not
        self._moderate_prompt(prompt)
        metrics = ingress_metrics()
        if not body.stream:
            out = await self._complete(model_id, prompt, params)
            metrics.usage(model_name, out.prompt_tokens, out.completion_tokens)
            text, reason = self._moderate_answer(out.text, out.finish_reason)
            if self._feedback:  # stored before the answer leaves, so feedback can follow at once
                await self._feedback.capture(rid, model_name, prompt, params, text, reason)
            choice = kind.answer(text, reason)
            usage = Usage.of(out.prompt_tokens, out.completion_tokens)
            return JSONResponse(kind.response(id=rid, model=model_name, choices=[choice], usage=usage).model_dump())

        deltas = await self._open_stream(model_id, prompt, params)
        head = {"id": rid, "created": int(time.time()), "model": model_name}
        guard = OutputGuard(self._policy, self._holdback) if self._check_outputs else None
        answer: list[str] = []  # the text sent, for capture

        def chunk(choices: list[Any], usage: Usage | None = None) -> str:
            return sse(kind.chunk(**head, choices=choices, usage=usage).model_dump())

        started, first = time.perf_counter(), None

        async def finish(reason: FinishReason, d: Delta) -> list[str]:
            """The closing events; a finished stream is captured before they leave, as a whole answer is."""
            if self._feedback:
                await self._feedback.capture(rid, model_name, prompt, params, "".join(answer), reason)
            metrics.usage(model_name, d.prompt_tokens, d.completion_tokens)
            if first is not None:
                metrics.timing(model_name, first - started, time.perf_counter() - started, d.completion_tokens)
            if reason == "content_filter":
                metrics.content_filter("answer", guard.flag.category)
            out = [chunk([kind.delta(None, reason)])]
            if body.include_usage:  # OpenAI's last chunk: no choices, the usage
                out.append(chunk([], Usage.of(d.prompt_tokens, d.completion_tokens)))
            return out

        async def events() -> AsyncIterator[str]:
            nonlocal first
            if kind.opening is not None:
                yield chunk([kind.opening()])
            async with contextlib.aclosing(deltas):  # leaving early (flagged answer) stops the generation
                async for d in deltas:
                    text = d.text if guard is None else guard.push(d.text)
                    if guard is not None and d.finish_reason is not None:
                        text += guard.flush()
                    if text:
                        first = first or time.perf_counter()
                        answer.append(text)
                        yield chunk([kind.delta(text, None)])
                    if guard is not None and guard.flag is not None:
                        for e in await finish("content_filter", d):
                            yield e
                        return
                    if d.finish_reason is not None:
                        for e in await finish(d.finish_reason, d):
                            yield e

        return self._event_stream(events())

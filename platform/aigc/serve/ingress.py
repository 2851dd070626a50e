"""The ``OpenAIIngress`` deployment: the OpenAI-compatible HTTP front (FastAPI on Ray Serve).

``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true`` -> server-sent
events), ``GET /healthz`` (cheap liveness for load balancers: answers without asking anything) and
``GET /readyz`` (readiness: 200 only when a generator replica answers its health check). It validates requests,
resolves the model id against the registry per request (an alias such as ``support-bot`` or
``support-bot:stable`` moves without a redeploy; answers are reused for ``serve.resolve_cache_s``,
:mod:`aigc.serve.resolver`) and calls the ``Generator`` with
``multiplexed_model_id`` = the resolved ``name:vN``, which is also the response's ``model``. Errors become
HTTP statuses only in :mod:`aigc.serve.api_errors` (OpenAI-shaped bodies; a 500 never carries exception text
or paths); the response shapes of the two endpoints are in :mod:`aigc.serve.shapes`, and answers are shaped,
checked, captured and counted in :mod:`aigc.serve.answers`. Before any route, the guard
(:mod:`aigc.serve.middleware`: CORS, API keys, body cap) and the metrics middleware run; content safety is
:mod:`aigc.serve.moderation`. With ``serve.capture``, answers are stored under their ids and
``POST /v1/feedback`` rates them (:mod:`aigc.serve.feedback`). ``POST /v1/adapters`` and
``DELETE /v1/adapters/NAME`` (admin keys) load and unload adapters by name (:mod:`aigc.serve.admin`). Calls to
the generator (deadline, one safe retry after a lost replica) are :mod:`aigc.serve.upstream`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime, and Serve's
# class-based routes do not resolve string annotations (a body model would become a query parameter).
import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from aigc.config import ModerationConfig, ServeConfig
from aigc.errors import RegistryError
from aigc.feedback.store import FeedbackRequest
from aigc.registry import Registry
from aigc.registry.runtime import ServedModels
from aigc.serve.admin import AdapterAdmin, LoadAdapterRequest
from aigc.serve.answers import Answerer, Turn
from aigc.serve.api_errors import ApiError, api_error_from, install_error_handlers
from aigc.serve.auth import proxy_bind_host
from aigc.serve.engine import Completion, Delta, Prompt, SamplingParams
from aigc.serve.engine.tool_prompts import ToolSyntax
from aigc.serve.feedback import FeedbackCapture
from aigc.serve.metrics import MetricsMiddleware, ingress_metrics, request_info
from aigc.serve.middleware import HttpGuard, install_guard, key_name_of
from aigc.serve.moderation import load_policy
from aigc.serve.quota import Quota
from aigc.serve.resolver import ModelResolver, check_servable, servable
from aigc.serve.responses import ModelCard, ModelList, new_id
from aigc.serve.schemas import ChatCompletionRequest, CompletionRequest
from aigc.serve.shapes import CHAT, TEXT, Kind
from aigc.serve.tool_calls import ToolCalls, plan_tools
from aigc.serve.upstream import GeneratorClient

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
# Outermost: counts every request, refused ones too, by route template (unknown paths are "other").
app.add_middleware(MetricsMiddleware)
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
        moderation: the ``serve.moderation`` section (see :mod:`aigc.serve.moderation`); None = no checks.
        security: the ``serve`` section, for its API key sources (``auth``, ``api_keys_file``,
            ``api_keys_env``), ``max_request_bytes`` and ``cors_origins``; the keys are read here, in the
            replica. None = the defaults.
        feedback_dir: where completions are captured and feedback is kept; None = capture off. Who may rate,
            how often, and how long captures are kept come from ``security`` (``feedback_from``,
            ``feedback_per_key_per_minute``, ``capture_retention_days``).
        resolve_cache_s: seconds a model id's resolution is reused (an alias move is seen within this).
        base_model_name: the base model's own id (hub id or directory name); only adapters trained on it are
            served. Defaults to ``base_model_id``.
        request_timeout_s: each request's deadline, from its arrival here.
    """

    def __init__(
        self,
        generator: DeploymentHandle,
        base_model_id: str,
        registry_dir: str,
        max_tokens_cap: int = 512,
        default_max_tokens: int = 64,
        moderation: ModerationConfig | None = None,
        security: ServeConfig | None = None,
        feedback_dir: str | None = None,
        resolve_cache_s: float = 1.0,
        base_model_name: str | None = None,
        request_timeout_s: float = 300.0,
    ):
        security = security or ServeConfig()
        # Exposure is decided from the address the proxy really binds (a Serve YAML's http_options.host).
        self.guard = HttpGuard(security, proxy_host=proxy_bind_host(security.host))
        self._generator_handle = generator
        self._generator = GeneratorClient(generator)
        self._base_model_id = base_model_id
        self._base_model_name = base_model_name or base_model_id
        self._timeout_s = request_timeout_s
        served = ServedModels(Registry(registry_dir))
        self._models = ModelResolver(served, ttl_s=resolve_cache_s)
        self._admin = AdapterAdmin(served, generator, base_model_id, self._base_model_name)
        # Serve runs the constructor on the replica's event loop: the listing refresh lives as long as the replica.
        self._listing_task = asyncio.get_running_loop().create_task(self._models.keep_listing())
        self._cap = max_tokens_cap
        self._default_max_tokens = min(default_max_tokens, max_tokens_cap)
        mod = moderation or ModerationConfig()
        self._policy = load_policy(mod.categories, mod.classifier)
        self._check_prompts = self._policy is not None and mod.check_prompts
        self._feedback = None
        if feedback_dir:
            self._feedback = FeedbackCapture(feedback_dir, owner_only=security.feedback_from == "owner",
                                             per_key_per_minute=security.feedback_per_key_per_minute,
                                             retention_days=security.capture_retention_days)  # fmt: skip
            self._retention_task = asyncio.get_running_loop().create_task(self._feedback.keep_sweeping())
        self._answers = Answerer(self._policy, mod.check_outputs, mod.holdback_chars, self._feedback)
        # Per-key limits, shared by every ingress replica of the app (a slot is held at most past the deadline).
        self._quota = Quota(security.app_name, lease_s=request_timeout_s + 30)
        self._tool_syntax: ToolSyntax | None = None  # the base model's, asked of a generator once

    # 1. models -----------------------------------------------------------------------------------------
    async def _model_cards(self) -> list[ModelCard]:
        """The base model; per name its bare name and its aliases (``root``: the version each serves now);
        then every version."""
        listing = await self._models.listing()
        cards = [ModelCard(id=self._base_model_id)]
        latest: dict[str, Any] = {}
        # Only what this server can serve: adapters of its base model (full fine-tunes and adapters of other
        # bases are refused with a 400 that says why, see check_servable).
        versions = [e for e in listing.versions if servable(e, self._base_model_name)]
        listed = {e.model_id for e in versions}
        for e in versions:  # ascending versions: the last one seen per name is the latest
            latest[e.name] = e
        aliases = [a for a in listing.aliases if a.target in listed]
        targets = {a.model_id: a for a in aliases}
        for name, e in sorted(latest.items()):
            bare = targets.get(name)
            root = bare.target if bare is not None else e.model_id
            cards.append(ModelCard(id=name, created=int(e.created_at), root=root, parent=e.base_model))
            for a in aliases:
                if a.name == name and a.model_id != name:
                    cards.append(ModelCard(id=a.model_id, created=int(a.updated_at), root=a.target,
                                           parent=e.base_model))  # fmt: skip
        for e in versions:
            if not e.runtime:  # a runtime adapter's card is its name's, above
                cards.append(ModelCard(id=e.model_id, created=int(e.created_at), root=e.model_id,
                                       parent=e.base_model))  # fmt: skip
        return cards

    async def _resolve(self, model: str, sticky: str | None = None) -> str:
        """The multiplexed model id for ``model``: "" for the base model, else the registry's ``name:vN`` (for an
        alias split between versions, the one this request gets: the same for the same ``sticky`` key)."""
        if model == self._base_model_id:
            return ""
        try:
            entry = await self._models.resolve(model, sticky)
        except RegistryError:
            ids = [c.id for c in await self._model_cards()]
            shown = ", ".join(ids[:_MAX_LISTED_IN_ERRORS]) + (" ..." if len(ids) > _MAX_LISTED_IN_ERRORS else "")
            raise ApiError(
                404,
                f"The model '{model}' does not exist. Available models: {shown}",
                param="model",
                code="model_not_found",
            ) from None
        check_servable(entry, self._base_model_name)
        return entry.model_id

    # 2. request -> params ------------------------------------------------------------------------------
    def _params(self, body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
        requested = body.requested_max_tokens
        if requested is None:
            max_tokens = self._default_max_tokens
        elif 1 <= requested <= self._cap:
            max_tokens = requested
        else:
            named = getattr(body, "max_completion_tokens", None) is not None  # 0 included: the value used
            param = "max_completion_tokens" if named else "max_tokens"
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
            logprobs=body.requested_logprobs,
            n=body.n,
            response_format=body.response_format,
        )

    async def _complete(self, model_id: str, prompt: Prompt, params: SamplingParams, deadline: float) -> Completion:
        try:
            return await self._generator.complete(model_id, prompt, params, deadline)
        except Exception as exc:
            raise api_error_from(exc, model_id or self._base_model_id) from None

    async def _open_stream(
        self, model_id: str, prompt: Prompt, params: SamplingParams, deadline: float
    ) -> AsyncIterator[Delta]:
        try:
            return await self._generator.open_stream(model_id, prompt, params, deadline)
        except asyncio.CancelledError:  # the client left before the first token
            raise
        except Exception as exc:
            raise api_error_from(exc, model_id or self._base_model_id) from None

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

    # 3. routes ----------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> Response:
        """Liveness for load balancers: cheap, asks nothing (a replica's own health is Serve's business)."""
        return JSONResponse({"status": "ok", "base_model": self._base_model_id})

    @app.get("/readyz")
    async def readyz(self) -> Response:
        """Readiness: 200 when a generator replica answers its health check within 5 s, else 503."""
        try:
            await asyncio.wait_for(self._generator_handle.check_health.remote(), 5.0)
        except Exception as exc:
            msg = f"no generator replica is ready ({type(exc).__name__}); retry shortly"
            raise ApiError(503, msg, type="server_error", code="not_ready") from None
        return JSONResponse({"status": "ready", "base_model": self._base_model_id})

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        policy = self.guard.policy(key_name_of(request))  # a key limited to some models sees only those
        cards = [c for c in await self._model_cards() if policy.allows(c.id)]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        messages = [m.as_template_dict() for m in body.messages]
        if body.response_format is not None and body.tools and body.tool_choice[0] != "none":
            msg = 'response_format cannot be combined with tools unless tool_choice is "none": a tool call is not JSON'
            raise ApiError(400, f"{msg} the format asks for", param="response_format")
        if body.tools and body.tool_choice[0] != "none" and self._tool_syntax is None:
            try:
                self._tool_syntax = await self._generator_handle.tool_syntax.remote()
            except Exception as exc:
                raise api_error_from(exc, self._base_model_id) from None
        prompt, tools = plan_tools(messages, body.tools, body.tool_choice, self._tool_syntax)
        return await self._run_request(CHAT, body, prompt, request, tools)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._run_request(TEXT, body, body.prompt_text, request)

    @app.post("/v1/adapters")
    async def load_adapter(self, body: LoadAdapterRequest, request: Request) -> Response:
        key = key_name_of(request)
        self._admin.check_admin(self.guard.keys is not None, self.guard.policy(key))
        card = await self._admin.load(body, key)
        self._models.forget(body.name)
        return JSONResponse(card.model_dump())

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(self, name: str, request: Request) -> Response:
        self._admin.check_admin(self.guard.keys is not None, self.guard.policy(key_name_of(request)))
        out = await self._admin.unload(name)
        self._models.forget(name)
        return JSONResponse(out)

    @app.post("/v1/feedback")
    async def feedback(self, body: FeedbackRequest, request: Request) -> Response:
        if self._feedback is None:
            raise ApiError(404, "feedback is off on this server (serve.capture: false)", code="feedback_disabled")
        return JSONResponse((await self._feedback.submit(body, key_name_of(request))).to_json())

    # 4. the one request path both endpoints share ------------------------------------------------------
    async def _run_request(
        self,
        kind: Kind,
        body: ChatCompletionRequest | CompletionRequest,
        prompt: Prompt,
        request: Request,
        tools: ToolCalls | None = None,
    ) -> Response:
        """Check the key's policy, resolve the model, admit under the key's limits (429 past them), generate, and
        answer in ``kind``'s OpenAI shape (JSON, or SSE when streaming) with the rate-limit headers."""
        deadline = time.time() + self._timeout_s  # wall clock: the generator replica may be on another node
        key = key_name_of(request)
        policy = self.guard.policy(key)
        if not policy.allows(body.model):  # OpenAI's answer for a model a key may not use
            msg = f"The model '{body.model}' does not exist or you do not have access to it."
            raise ApiError(404, msg, param="model", code="model_not_found")
        model_id = await self._resolve(body.model, sticky=body.user or key)
        model_name = model_id or self._base_model_id
        request_info()["model"] = model_name  # a metrics label: only ids that exist, never what clients typed
        params = self._params(body)
        rid = new_id(kind.id_prefix)  # the id feedback refers to, streamed or not
        self._moderate_prompt(prompt)
        admission = await self._quota.admit(key, policy)  # 429 with Retry-After past a limit
        logger.info("%s: key %s, model %s", rid, key or "-", model_name)  # the key's name, never the key
        turn = Turn(kind, rid, model_name, prompt, params, key, admission, include_usage=body.include_usage,
                    tools=tools)  # fmt: skip
        if not body.stream:
            try:
                out = await self._complete(model_id, prompt, params, deadline)
            except BaseException:
                await admission.finish()  # a failed request frees its slot; its tokens are not known
                raise
            return await self._answers.whole(turn, out)
        try:
            deltas = await self._open_stream(model_id, prompt, params, deadline)
        except BaseException:
            await admission.finish()
            raise
        return self._answers.stream(turn, deltas)

"""OpenAI request and response shapes (the subset this platform serves).

Requests accept and ignore fields they do not know (``presence_penalty``, ``frequency_penalty``...), as other
OpenAI-compatible servers do, so stock clients work; the fields they do know are validated here, and a bad
value becomes a 400 whose ``param`` names the field. A field that asks for a feature this server does not have
(``tools``, ``logit_bias``...) is refused the same way rather than silently ignored, unless it holds
its "off" value (``false``, ``null``, ``1``, ``"none"``, ``{"type": "text"}``). Responses are built from these
models and dumped to JSON.

The OpenAPI schema (``/openapi.json``) states the bounds validation enforces, so a client or a fuzzer generating
from it sends only requests this server accepts: where a validator below (or the ingress, for ``max_tokens``)
enforces a bound with a clearer message than pydantic's, the bound is also written into the field's schema
(:func:`_schema_bounds`). The upper bound of ``max_tokens`` is each server's ``serve.max_tokens_cap``.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer

from aigc.serve.engine.types import MAX_CHOICES, MAX_TOP_LOGPROBS
from aigc.serve.logprob_shapes import ChatLogprobs, CompletionLogprobs

__all__ = [
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "CompletionChunk",
    "CompletionRequest",
    "CompletionResponse",
    "ErrorBody",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
    "Usage",
    "error_body",
    "new_id",
]

MAX_STOP_SEQUENCES = 4
MAX_SEED = 2**63  # torch generators take a 64-bit seed; OpenAI's is a signed 64-bit integer
MAX_COMPLETION_LOGPROBS = 5  # completions' integer ``logprobs`` (OpenAI's cap)

# Fields asking for features this server does not have: refused (400 naming the field) unless "off".
# field -> (is the value "off"?, the "off" value: in the schema's enum, and as JSON in the message)
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], Any]] = {
    "logit_bias": (lambda v: v is None or v == {}, {}),
    "best_of": (lambda v: v is None or v == 1, 1),
    "echo": (lambda v: v is None or v is False, False),
    "suffix": (lambda v: v is None or v == "", ""),
    "tools": (lambda v: v is None or v == [], []),
    "functions": (lambda v: v is None or v == [], []),
    "tool_choice": (lambda v: v is None or v == "none", "none"),
    "function_call": (lambda v: v is None or v == "none", "none"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, {"type": "text"}),
}


def _unsupported(field: str) -> Any:
    off = _UNSUPPORTED[field][1]
    return Field(
        None,
        description=f"Not supported by this server: only null or {json.dumps(off)} is accepted.",
        json_schema_extra={"enum": [None, off]},
    )


def _schema_bounds(**by_type: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A ``json_schema_extra`` writing bounds that a validator enforces into the field's schema, per JSON type:
    ``_schema_bounds(integer={"minimum": 1})`` on an ``int | None`` field bounds its integer branch only."""

    def extra(schema: dict[str, Any]) -> None:
        for branch in schema.get("anyOf", [schema]):
            branch.update(copy.deepcopy(by_type.get(branch.get("type"), {})))

    return extra


_POSITIVE_INT = _schema_bounds(integer={"minimum": 1})  # the ingress checks 1..serve.max_tokens_cap
_STOP_TEXT = {"type": "string", "minLength": 1}


def new_id(prefix: str) -> str:
    """A response id such as ``chatcmpl-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, description="Send a last chunk with usage and no choices.")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="Base model id, adapter name (latest version) or name:vN.")
    max_tokens: int | None = Field(
        None, description="Tokens to generate; None = the server default.", json_schema_extra=_POSITIVE_INT
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy; higher = more random.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(
        None,
        description=f"Up to {MAX_STOP_SEQUENCES} stop strings.",
        json_schema_extra=_schema_bounds(
            string=_STOP_TEXT, array={"items": _STOP_TEXT, "maxItems": MAX_STOP_SEQUENCES}
        ),
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(
        1,
        description=f"Choices to generate (1..{MAX_CHOICES}) from one prefill of the prompt; with a seed, choice i "
        "samples with seed + i.",
        json_schema_extra=_schema_bounds(integer={"minimum": 1, "maximum": MAX_CHOICES}),
    )
    seed: int | None = Field(
        None, ge=0, lt=MAX_SEED, description="Seed for sampling; same seed + same request = same text."
    )
    user: str | None = None
    logit_bias: Any = _unsupported("logit_bias")

    @field_validator(*_UNSUPPORTED, check_fields=False)
    @classmethod
    def _refuse_unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        is_off, off = _UNSUPPORTED[info.field_name]
        if not is_off(v):
            raise ValueError(f"not supported by this server; leave it out (or send null or {json.dumps(off)})")
        return v

    @field_validator("n")
    @classmethod
    def _choices_within_cap(cls, v: int) -> int:
        if not 1 <= v <= MAX_CHOICES:
            raise ValueError(f"n must be between 1 and {MAX_CHOICES}, got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str

    def as_template_dict(self) -> dict[str, str]:
        """The message as the chat template sees it (``developer`` is OpenAI's new name for ``system``)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(
        None, description="OpenAI's newer name for max_tokens.", json_schema_extra=_POSITIVE_INT
    )
    logprobs: bool | None = Field(None, description="Return each generated token's log-probability.")
    top_logprobs: int | None = Field(
        None,
        description=f"Alternatives per token (0..{MAX_TOP_LOGPROBS}) with their log-probabilities; needs "
        "logprobs: true.",
        json_schema_extra=_schema_bounds(integer={"minimum": 0, "maximum": MAX_TOP_LOGPROBS}),
    )
    tools: Any = _unsupported("tools")
    tool_choice: Any = _unsupported("tool_choice")
    functions: Any = _unsupported("functions")
    function_call: Any = _unsupported("function_call")
    response_format: Any = _unsupported("response_format")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_within_cap(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not 0 <= v <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {v}")
        if v and not info.data.get("logprobs"):  # `logprobs` is declared first, so validated already
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def requested_logprobs(self) -> int | None:
        """Alternatives per token, or None when no log-probabilities were asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(
        description="The text to continue (one prompt per request).",
        json_schema_extra=_schema_bounds(array={"minItems": 1, "maxItems": 1}),
    )
    logprobs: int | None = Field(
        None,
        description=f"Log-probabilities of each token and its N likeliest alternatives (0..{MAX_COMPLETION_LOGPROBS}).",
        json_schema_extra=_schema_bounds(integer={"minimum": 0, "maximum": MAX_COMPLETION_LOGPROBS}),
    )
    best_of: Any = _unsupported("best_of")
    echo: Any = _unsupported("echo")
    suffix: Any = _unsupported("suffix")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError(f"exactly one prompt per request is supported, got a list of {len(v)}")
        return v

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs_within_cap(cls, v: Any) -> Any:
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_COMPLETION_LOGPROBS):
            raise ValueError(f"logprobs must be an integer between 0 and {MAX_COMPLETION_LOGPROBS}, got {v!r}")
        return v

    @property
    def requested_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def prompt_text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


# ----------------------------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "content_filter"] | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        # OpenAI sends only what changed: {"role": "assistant", "content": ""}, {"content": "..."}, {}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length", "content_filter"] | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length", "content_filter"] | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# Streamed completions use the same object name as the non-streamed response (as OpenAI does).
CompletionChunk = CompletionResponse


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "aigc"
    root: str | None = Field(None, description="For an adapter: the registry version it resolves to.")
    parent: str | None = Field(None, description="For an adapter: the base model it was trained on.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------------------------- errors
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The JSON body OpenAI sends with a 4xx/5xx: ``{"error": {"message", "type", "param", "code"}}``."""
    return ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code)).model_dump()

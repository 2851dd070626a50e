"""OpenAI request shapes (the subset this platform serves); the response shapes are in
:mod:`aigc.serve.responses`.

Requests accept and ignore fields they do not know (``presence_penalty``, ``frequency_penalty``...), as other
OpenAI-compatible servers do, so stock clients work; the fields they do know are validated here, and a bad
value becomes a 400 whose ``param`` names the field. A field that asks for a feature this server does not have
(``logit_bias``, ``response_format``...) is refused the same way rather than silently ignored, unless it holds
its "off" value (``false``, ``null``, ``1``, ``"none"``, ``{"type": "text"}``).

The OpenAPI schema (``/openapi.json``) states the bounds validation enforces, so a client or a fuzzer generating
from it sends only requests this server accepts: where a validator below (or the ingress, for ``max_tokens``)
enforces a bound with a clearer message than pydantic's, the bound is also written into the field's schema
(:func:`_schema_bounds`). The upper bound of ``max_tokens`` is each server's ``serve.max_tokens_cap``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from aigc.serve.engine.grammar import MAX_SCHEMA_CHARS, parse_response_format
from aigc.serve.engine.types import MAX_CHOICES, MAX_TOP_LOGPROBS, ResponseFormat
from aigc.serve.tool_schemas import (
    ChoiceMode,
    RequestToolCall,
    TextPart,
    check_tool_choice,
    check_tools,
    template_message,
    tool_choice_field,
    tools_field,
)

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "StreamOptions",
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
    "functions": (lambda v: v is None or v == [], []),
    "function_call": (lambda v: v is None or v == "none", "none"),
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


_POSITIVE_INT = _schema_bounds(integer={"minimum": 1})
# What the OpenAPI schema says of response_format. Whether a json_schema's schema is valid JSON Schema that the
# grammar engine can enforce is checked by the validator (a 400 with the reason): no JSON Schema can state it.
_RESPONSE_FORMAT_SCHEMA = {
    "anyOf": [
        {"type": "null"},
        {"type": "object", "properties": {"type": {"enum": ["text", "json_object"]}}, "required": ["type"]},
        {
            "type": "object",
            "properties": {
                "type": {"enum": ["json_schema"]},
                "json_schema": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                        "description": {"type": "string"},
                        "schema": {"type": "object"},
                        "strict": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
                    },
                    "required": ["name"],
                },
            },
            "required": ["type", "json_schema"],
        },
    ]
}  # the ingress checks 1..serve.max_tokens_cap
_STOP_TEXT = {"type": "string", "minLength": 1}


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
    response_format: Any = Field(
        None,
        description='{"type": "text"} (the default), {"type": "json_object"} (any JSON object) or {"type": '
        '"json_schema", "json_schema": {"name", "schema", "strict"}}: JSON valid under the schema (always strict). '
        f"Enforced while decoding; a schema is at most {MAX_SCHEMA_CHARS} characters of JSON.",
        json_schema_extra=_RESPONSE_FORMAT_SCHEMA,
    )

    @field_validator("response_format")
    @classmethod
    def _check_response_format(cls, v: Any) -> ResponseFormat | None:
        return parse_response_format(v)

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

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(
        None,
        description="The text (a list of text parts is joined); null (as on an assistant turn with tool_calls) "
        "is empty text.",
    )
    tool_calls: list[RequestToolCall] | None = Field(None, description="Calls an assistant turn made.")
    tool_call_id: str | None = Field(None, description="On a tool turn: the call this result answers.")
    name: str | None = None

    @model_validator(mode="after")
    def _tool_turns(self) -> ChatMessage:
        for call in self.tool_calls or [] if self.role == "assistant" else []:
            call.as_template_dict()  # arguments must be a JSON object
        return self

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it (``developer`` is OpenAI's new name for ``system``), in the
        shape training renders (:mod:`aigc.data.formats`): tool calls with object arguments, a tool result with
        its call id."""
        role = "system" if self.role == "developer" else self.role
        return template_message(role, self.text, self.tool_calls, self.tool_call_id, self.name)


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
    tools: Any = tools_field()
    tool_choice: Any = tool_choice_field()
    functions: Any = _unsupported("functions")
    function_call: Any = _unsupported("function_call")

    @field_validator("tools")
    @classmethod
    def _check_tools(cls, v: Any) -> list[dict[str, Any]] | None:
        return check_tools(v)

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, v: Any, info: ValidationInfo) -> tuple[ChoiceMode, str | None]:
        if "tools" not in info.data:  # tools itself was refused: that error is the one reported
            return "none", None
        return check_tool_choice(v, info.data["tools"])

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
        if isinstance(v, float) and v.is_integer():  # JSON's 2.0 is the integer 2 (as pydantic reads other ints)
            v = int(v)
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

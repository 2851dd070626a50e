"""The serving sections of the config: the endpoint (``serve``), its autoscaling and its content safety."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from aigc.config.section import _Section

__all__ = ["AutoscalingConfig", "ModerationConfig", "ServeConfig"]


class AutoscalingConfig(_Section):
    min_replicas: int = Field(1, ge=0, description="Generator replicas kept running with no traffic.")
    max_replicas: int = Field(
        2, ge=1, description="Most generator replicas; on a small machine 1 (a second only competes for its cores)."
    )
    target_ongoing_requests: float = Field(
        24.0,
        gt=0,
        description="Per-replica load the autoscaler aims for; near serve.max_batch_size, so a replica fills most "
        "of its batch before Serve adds another.",
    )
    upscale_delay_s: float = Field(
        5.0, ge=0, description="Seconds the load must stay above target before a replica is added."
    )
    downscale_delay_s: float = Field(
        30.0, ge=0, description="Seconds the load must stay below target before a replica is removed."
    )

    @model_validator(mode="after")
    def _min_le_max(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ModerationConfig(_Section):
    """Content safety (``aigc.serve.moderation``): rules per category and/or a pluggable classifier."""

    categories: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Category -> regular expressions (case-insensitive) whose match flags a prompt or answer.",
    )
    classifier: str | None = Field(
        None, description="'package.module:factory' returning an object with check(text) -> Flag | None."
    )
    check_prompts: bool = Field(True, description="Refuse flagged prompts with 400 (code content_filter).")
    check_outputs: bool = Field(True, description="Stop flagged answers with finish_reason content_filter.")
    holdback_chars: int = Field(
        64, ge=0, description="Streamed characters held back until checked; >= the longest flagged phrase."
    )

    @field_validator("categories")
    @classmethod
    def _patterns_compile(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for category, patterns in v.items():
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as exc:
                    raise ValueError(f"category {category!r}: pattern {p!r} does not compile: {exc}") from None
        return v

    @field_validator("classifier")
    @classmethod
    def _import_path(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[\w.]+:\w+", v):
            raise ValueError(f"must look like 'package.module:factory', got {v!r}")
        return v


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", description="HTTP bind address; 0.0.0.0 to accept remote clients.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy.")
    app_name: str = Field("aigc", description="Serve application name.")
    base_model_id: str | None = Field(None, description="Model id clients use for the base model.")
    max_tokens_cap: int = Field(512, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens of a request that sets none.")
    max_batch_size: int = Field(
        32,
        ge=1,
        description="Requests one replica decodes together (continuous batching): more = higher throughput, "
        "slower steps for each request.",
    )
    max_ongoing_requests: int = Field(
        32, ge=1, description="Requests Serve sends one replica at once; keep it >= max_batch_size to fill batches."
    )
    max_queued_requests: int = Field(32, ge=-1, description="Queue per caller beyond which requests get 503.")
    max_adapters_per_replica: int = Field(4, ge=1, description="LoRA adapters kept loaded (LRU) per replica.")
    max_surge_percent: int = Field(
        100,
        ge=0,
        le=100,
        description="Extra replicas a redeploy may start, in percent of the replica count (Serve's "
        "max_surge_percent): 100 keeps every old replica serving until its replacement is ready, so a config "
        "change never leaves the app without a replica; it needs room for the extra replicas (CPUs/GPUs) "
        "meanwhile. 0 stops old replicas first (no extra resources; requests wait while replicas restart).",
    )
    resolve_cache_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description="Seconds a model id's resolution (alias -> version) is reused: an `aigc promote` reaches "
        "traffic within this long, and the registry is read at most once per id per period. 0 = every request.",
    )
    request_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Each request's deadline from its arrival: past it the request ends with 504 (code "
        "request_timeout; an in-band error for a stream already sending) and its batch row is freed.",
    )
    graceful_shutdown_s: float = Field(
        60.0,
        ge=0,
        description="A replica being stopped (downscale, redeploy, rollout) takes no new requests and finishes the "
        "ones in flight, streams included, for up to this long before it goes (Serve's "
        "graceful_shutdown_timeout_s, for the generator and the ingress).",
    )
    health_check_period_s: float = Field(
        5.0,
        gt=0,
        description="How often Serve asks each generator replica whether its engine is alive; three failed checks "
        "in a row replace the replica.",
    )
    engine_stall_timeout_s: float = Field(
        30.0,
        gt=0,
        description="With requests waiting, no forward pass for this long fails the replica's health check (a hung "
        "device or a stuck model lock); keep it above the slowest prefill of a max_prompt_tokens prompt.",
    )
    adapter_retry_s: float = Field(
        30.0,
        ge=0,
        description="An adapter that failed to load is answered with the same error for this long before the "
        "replica tries again (no retry storm).",
    )
    ingress_replicas: int = Field(
        2,
        ge=1,
        description="HTTP ingress replicas (0.1 CPU each): more than one, so losing one never stops the endpoint.",
    )
    cpus_per_replica: float = Field(
        1.0, gt=0, description="CPUs per generator replica; Ray sets torch's thread count to it."
    )
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per generator replica (1 on a GPU cluster).")
    quantization: Literal["none", "int8", "nf4"] = Field(
        "none",
        description="The base model's weights when served: int8 = weight-only int8 (torchao on CPU, the `quant` "
        "extra; bitsandbytes on GPU, the `gpu` extra), nf4 = 4-bit NF4 (GPU only); adapters stay full precision.",
    )
    autoscaling: AutoscalingConfig = Field(
        default_factory=AutoscalingConfig, description="Generator replica autoscaling (Serve's autoscaling_config)."
    )
    moderation: ModerationConfig = Field(default_factory=ModerationConfig, description="Content safety.")
    # Security (docs/operations.md "Security"): key sources only, never keys; limits on what a request may send.
    auth: Literal["auto", "keys", "none"] = Field(
        "auto",
        description="auto = check API keys when a key source is set, else serve on a loopback host only; "
        "keys = require them; none = no keys, on any host (e.g. behind an authenticating proxy).",
    )
    api_keys_file: str | None = Field(
        None,
        description="Keys file (path or URI, read where the server runs) written by `aigc keys add`: names, "
        "SHA-256 hashes of the keys and per-key limits; re-read when it changes.",
    )
    api_keys_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Environment variable holding name:key,name2:key2."
    )
    api_keys_reload_s: float = Field(
        2.0,
        gt=0,
        le=300,
        description="How often (at most, on a request) the ingress checks the keys file for changes: a key added "
        "or revoked with `aigc keys` is in force within this long, without a restart.",
    )
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest request body; larger gets 413.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt in tokens (400 beyond); None = the model's context."
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins browsers may call the API from (CORS); empty = none."
    )

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for o in v:
            if o != "*" and not re.fullmatch(r"https?://[^/\s]+", o):
                raise ValueError(f"{o!r} is not an origin like https://app.example.com (scheme://host[:port])")
        return v

    capture: bool = Field(
        False,
        description="Store each request's messages, model, sampling settings and answer under its completion id, "
        "and accept POST /v1/feedback (the data `aigc feedback export` turns into a dataset).",
    )
    feedback_dir: str | None = Field(
        None, min_length=1, description="Captures and feedback (local dir or URI); None = <output_dir>/feedback."
    )
    feedback_from: Literal["owner", "any"] = Field(
        "owner",
        description="Who may rate or correct an answer: owner = only the API key that made the request (another "
        "key gets 403 not_completion_owner); any = any key (each key's rating is kept apart).",
    )
    feedback_per_key_per_minute: int | None = Field(
        60,
        ge=1,
        description="Feedback posts one API key may send per minute, counted in each ingress replica (so up to "
        "ingress_replicas times this across the endpoint); over it 429 rate_limit_exceeded with Retry-After. "
        "None = no limit.",
    )
    capture_retention_days: float | None = Field(
        None,
        gt=0,
        description="Captured answers older than this are deleted with their feedback: hourly by each ingress "
        "replica, and by `aigc feedback export` before it reads. None = kept until `aigc feedback delete`.",
    )

    @model_validator(mode="after")
    def _default_le_cap(self) -> ServeConfig:
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) > max_tokens_cap")
        if self.autoscaling.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError(
                f"autoscaling.target_ongoing_requests ({self.autoscaling.target_ongoing_requests:g}) > "
                f"max_ongoing_requests ({self.max_ongoing_requests}): replicas could never reach the target"
            )
        if self.quantization == "nf4" and self.gpus_per_replica == 0:
            raise ValueError(
                "quantization 'nf4' needs a CUDA GPU (bitsandbytes 4-bit kernels): set gpus_per_replica=1 on a GPU "
                "machine, or use quantization=int8 on CPU"
            )
        if self.auth == "keys" and not (self.api_keys_file or self.api_keys_env):
            raise ValueError("auth is 'keys' but neither api_keys_file nor api_keys_env is set")
        return self

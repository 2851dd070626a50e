"""The config's sections: one pydantic model per stage, each key typed, documented and validated where it is
defined. :mod:`aigc.config` loads a YAML file and overrides into :class:`PlatformConfig`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

__all__ = [
    "AutoscalingConfig",
    "ClusterConfig",
    "DataConfig",
    "LoraConfig",
    "ModelConfig",
    "ModerationConfig",
    "PlatformConfig",
    "ServeConfig",
    "SourceConfig",
    "TrainConfig",
    "TrackingConfig",
    "TuneConfig",
]

DataFormat = Literal["alpaca", "messages", "sharegpt", "text"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field("assets/tiny-base", description="Hub id or local directory of the base causal LM.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; 'auto' = float32 on CPU, bfloat16 on GPUs that support it."
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the hub (off = safer).")


class SourceConfig(_Section):
    """One dataset of a mixture (an entry of ``data.path`` given as a list)."""

    path: str = Field(..., min_length=1, description="File, directory or glob; local or s3:// gs://.")
    format: DataFormat | None = Field(None, description="Row format of this dataset; unset = data.format.")
    columns: dict[str, str] | None = Field(None, description="Column renames of this dataset; unset = data.columns.")
    weight: float = Field(
        1.0,
        gt=0,
        description="Rows of this dataset per epoch, relative to its size: 2 = every row twice, "
        "0.25 = a quarter of its rows (chosen by a stable hash).",
    )


def _kind(v: Any) -> str:
    return "list" if isinstance(v, list) else "source" if isinstance(v, dict | SourceConfig) else "path"


# Tagged unions: a wrong entry gets one error at its own place (data.path.list.1.source.weight), not one per
# alternative.
_Source = Annotated[Annotated[str, Tag("path")] | Annotated[SourceConfig, Tag("source")], Discriminator(_kind)]
_Sources = Annotated[
    Annotated[str, Tag("path")] | Annotated[SourceConfig, Tag("source")] | Annotated[list[_Source], Tag("list")],
    Discriminator(_kind),
]


class DataConfig(_Section):
    path: _Sources = Field(
        "assets/demo-data/support.jsonl",
        description="File, directory or glob (local, s3://, gs://); or a list of them, each a path or "
        "{path, format, columns, weight} to mix datasets.",
    )
    format: DataFormat = Field("alpaca", description="Row format: alpaca | messages | sharegpt | text.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename source columns to the format's names, e.g. {question: instruction, answer: output}.",
    )
    max_length: int = Field(512, ge=8, description="Longest tokenized example, in tokens (see data.overflow).")
    overflow: Literal["truncate", "drop"] = Field(
        "truncate",
        description="A longer example: truncate (prompt cut from the left, then the answer from the right) "
        "or drop (quarantined as too_long).",
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of rows held out for evaluation.")
    seed: int = Field(0, description="Seed of the deterministic train/val split.")
    tokenizer_actors: int | None = Field(
        None, ge=1, description="Largest Ray Data actor pool that tokenizes; unset = the cluster's CPUs."
    )
    system_prompt: str | None = Field(None, description="System message prepended to every conversation.")
    dedup: bool = Field(True, description="Drop exact duplicates (same normalized prompt and answer).")
    packing: bool = Field(
        False,
        description="Pack short examples into rows of up to max_length tokens (no attention across examples).",
    )

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("an empty list: give at least one file, directory, glob or {path, weight}")
        if isinstance(v, str) and not v.strip():
            raise ValueError("empty: give a file, directory or glob")
        return v

    def sources(self) -> list[SourceConfig]:
        """Every dataset of ``path`` with its format and columns filled in from this section."""
        items = self.path if isinstance(self.path, list) else [self.path]
        out = []
        for item in items:
            src = SourceConfig(path=item) if isinstance(item, str) else item
            out.append(
                src.model_copy(
                    update={
                        "format": src.format or self.format,
                        "columns": self.columns if src.columns is None else src.columns,
                    }
                )
            )
        return out


class LoraConfig(_Section):
    r: int = Field(8, ge=1, description="LoRA rank: higher = more capacity and memory.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt, or 'all-linear' for every linear layer but the head.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale = alpha / sqrt(r) (better at high r).")
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA (magnitude + direction).")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter, e.g. [lm_head, embed_tokens]."
    )


class TrainConfig(_Section):
    method: Literal["lora", "qlora", "full"] = Field(
        "lora", description="LoRA adapter, QLoRA (4-bit base, GPU only, `gpu` extra) or full fine-tune."
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp = a replica per worker; fsdp = parameters sharded by decoder layer across workers."
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Autocast the forward pass (bf16 or fp16 on GPU; bf16 also runs on CPU)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks); one GPU each with use_gpu.")
    use_gpu: bool = Field(False, description="Place each worker on a GPU (NCCL) instead of CPU (gloo).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    epochs: int = Field(3, ge=1, description="Passes over the training split.")
    batch_size: int = Field(8, ge=1, description="Examples per worker per step.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated before each optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="Learning-rate schedule after warmup: constant, linear or cosine decay to 0."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not on biases and norm weights).")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Share of steps with linear warmup.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup in optimizer steps; overrides warmup_ratio.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping (global L2 norm).")
    adapter_name: str = Field("adapter", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Registry name.")
    seed: int = Field(0, description="Seeds weights init, shuffling and dropout: same seed, same run on CPU.")
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts from the last checkpoint (-1 = inf).")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="Also checkpoint every N optimizer steps (mid-epoch); unset = at epoch ends only."
    )
    eval_every_steps: int | None = Field(
        None, ge=1, description="Also evaluate every N optimizer steps; unset = at epoch ends only."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept: the best K by eval_loss (else newest).")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after N evaluations without an eval_loss improvement; unset = never."
    )
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest eval_loss drop that counts.")
    log_every_steps: int = Field(10, ge=1, description="A progress line (loss, tokens/s, ETA) every N steps.")
    eval_generation_samples: int = Field(
        0, ge=0, description="Val prompts answered greedily at each eval for exact match and ROUGE-L; 0 = off."
    )
    eval_max_new_tokens: int = Field(48, ge=1, description="Longest generated answer for the generation metrics.")
    run_name: str | None = Field(None, description="Ray Train run name; re-running the same name resumes.")

    @model_validator(mode="after")
    def _methods(self) -> TrainConfig:
        if self.method == "qlora" and not self.use_gpu:
            raise ValueError(
                "method 'qlora' quantizes the base model with bitsandbytes, which needs a CUDA GPU: set "
                "train.use_gpu=true on a GPU machine (install with the `gpu` extra), or use method 'lora' on CPU"
            )
        if self.mixed_precision == "fp16" and not self.use_gpu:
            raise ValueError("mixed_precision 'fp16' needs a GPU (train.use_gpu=true); on CPU use 'bf16' or 'no'")
        return self


class TrackingConfig(_Section):
    """Experiment tracking from rank 0: params, per-step metrics and artifacts (loss plot, adapter)."""

    mlflow: bool = Field(
        True, description="Log to MLflow (a local file store under <output_dir>/mlruns unless tracking_uri is set)."
    )
    tensorboard: bool = Field(True, description="Write TensorBoard event files under <output_dir>/tensorboard.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (http://host:5000, databricks, ...); unset = <output_dir>/mlruns."
    )
    experiment: str | None = Field(None, description="MLflow experiment name; unset = train.adapter_name.")


class TuneConfig(_Section):
    space: str = Field("tune_spaces/lora_lr_rank.yaml", description="Search-space YAML in tune_spaces/.")
    num_samples: int = Field(4, ge=1, description="Trials sampled from the space.")
    max_concurrent_trials: int | None = Field(None, ge=1, description="None = as many as the cluster fits.")
    search: Literal["random", "grid", "optuna"] = Field(
        "random",
        description="random: sample the space; grid: every combination of choice/grid keys once; optuna: TPE "
        "(the `tune` extra).",
    )
    scheduler: Literal["asha", "median", "pbt", "none"] = Field(
        "asha",
        description="asha (successive halving), median (median stopping rule), pbt (population-based training: "
        "weak trials continue from a better trial's checkpoint with perturbed values) or none.",
    )
    metric: str = Field("eval_loss", description="Reported metric the scheduler and the best-trial choice use.")
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(1, ge=1, description="Reports (evaluations) every trial makes before it may be stopped.")
    reduction_factor: int = Field(2, ge=2, description="ASHA keeps 1/reduction_factor trials at each rung.")
    perturbation_interval: int = Field(
        1, ge=1, description="PBT: exploit/explore every N perturbation_units (each one a checkpoint)."
    )
    perturbation_unit: Literal["epoch", "step"] = Field(
        "epoch", description="PBT: the unit of perturbation_interval: epochs, or optimizer steps."
    )
    seed: int | None = Field(None, description="Seed of random and Optuna sampling: same seed, same trials.")
    num_workers_per_trial: int = Field(1, ge=1, description="Ray Train workers in each trial.")
    name: str = Field("sweep", description="Experiment name under <output_dir>/sweep/.")


class AutoscalingConfig(_Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(
        24.0,
        gt=0,
        description="Per-replica load the autoscaler aims for; near serve.max_batch_size, so a replica fills most "
        "of its batch before Serve adds another.",
    )
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)

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
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = Field("aigc", description="Serve application name.")
    base_model_id: str | None = Field(None, description="Model id clients use for the base model.")
    max_tokens_cap: int = Field(512, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(64, ge=1)
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
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    moderation: ModerationConfig = Field(default_factory=ModerationConfig)
    # Security (README "Security"): key sources only, never keys; limits on what a request may send.
    auth: Literal["auto", "keys", "none"] = Field(
        "auto",
        description="auto = check API keys when a key source is set, else serve on a loopback host only; "
        "keys = require them; none = no keys, on any host (e.g. behind an authenticating proxy).",
    )
    api_keys_file: str | None = Field(
        None, description="Keys file (path or URI, read where the server runs): YAML/JSON name: key, or name:key lines."
    )
    api_keys_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Environment variable holding name:key,name2:key2."
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

    @model_validator(mode="after")
    def _default_le_cap(self) -> ServeConfig:
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) > max_tokens_cap")
        if self.autoscaling.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError(
                f"autoscaling.target_ongoing_requests ({self.autoscaling.target_ongoing_requests:g}) > "
                f"max_ongoing_requests ({self.max_ongoing_requests}): replicas could never reach the target"
            )
        if self.auth == "keys" and not (self.api_keys_file or self.api_keys_env):
            raise ValueError("auth is 'keys' but neither api_keys_file nor api_keys_env is set")
        return self


class ClusterConfig(_Section):
    num_cpus: int | None = Field(
        None,
        ge=1,
        description="Logical CPUs of the embedded local cluster; ignored when joining RAY_ADDRESS.",
    )


class PlatformConfig(_Section):
    """One run of the platform: every stage reads the section it needs."""

    output_dir: str = Field("runs/demo", description="Where a run writes everything (local dir or URI).")
    registry_dir: str = Field("runs/registry", description="Where trained adapters are registered.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @field_validator("output_dir", "registry_dir")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

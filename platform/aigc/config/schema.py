"""The config's sections: one pydantic model per stage, each key typed, documented and validated where it is
defined (the serving sections in :mod:`aigc.config.serving`). :mod:`aigc.config` loads a YAML file and overrides
into :class:`PlatformConfig`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from aigc.config.generate import GenerateConfig, JudgeConfig
from aigc.config.pipeline import PipelineConfig
from aigc.config.preference import PreferenceConfig, check_pair_data
from aigc.config.section import _Section
from aigc.config.serving import AutoscalingConfig, ModerationConfig, ServeConfig

__all__ = [
    "AutoscalingConfig",
    "ClusterConfig",
    "DataConfig",
    "GenerateConfig",
    "JudgeConfig",
    "LoraConfig",
    "ModelConfig",
    "ModerationConfig",
    "PipelineConfig",
    "PlatformConfig",
    "PreferenceConfig",
    "ServeConfig",
    "SourceConfig",
    "TrainConfig",
    "TrackingConfig",
    "TuneConfig",
]

DataFormat = Literal["alpaca", "messages", "sharegpt", "text"]


class ModelConfig(_Section):
    """The base model. A hub id is resolved once per command, on the driver (:mod:`aigc.models.hub`): workers,
    trials and replicas load ``resolved_path``, never the hub id."""

    name_or_path: str = Field(
        "assets/tiny-base", description="Hub id (org/name) or local directory of the base causal LM."
    )
    revision: str | None = Field(
        None, min_length=1, description="Hub branch, tag or commit of a hub id; unset = main. Pinned to one commit "
        "for the whole command."
    )  # fmt: skip
    cache_dir: str | None = Field(
        None,
        min_length=1,
        description="Where hub models are downloaded, once: a directory every node mounts, or s3:// gs:// (the "
        "driver uploads the snapshot, other nodes copy it from there); unset = the driver's Hugging Face cache.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; 'auto' = float32 on CPU, bfloat16 on GPUs that support it."
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the hub (off = safer).")
    commit: str | None = Field(
        None, description="Set by the platform on the driver: the hub commit the run uses (none for a local directory)."
    )
    resolved_path: str | None = Field(
        None, description="Set by the platform on the driver: the snapshot every process loads the model from."
    )

    def load_path(self) -> str:
        """What a process loads: the resolved snapshot once the driver resolved it, else ``name_or_path``."""
        return self.resolved_path or self.name_or_path


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
    val_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of rows held out for evaluation (split by a hash of the prompt: stable, no leakage).",
    )
    seed: int = Field(0, description="Seed of the deterministic train/val split.")
    tokenizer_actors: int | None = Field(
        None, ge=1, description="Largest Ray Data actor pool that tokenizes; unset = the cluster's CPUs minus one."
    )
    system_prompt: str | None = Field(None, description="System message prepended to every conversation.")
    dedup: bool = Field(True, description="Drop exact duplicates (same normalized prompt and answer).")
    packing: bool = Field(
        False,
        description="Pack short examples into rows of up to max_length tokens (no attention across examples).",
    )
    preference: bool = Field(False, description="Rows are preference pairs: prompt, `chosen` and `rejected` answers.")
    keep_shard_sets: int = Field(
        3,
        ge=1,
        description="Shard sets kept under output_dir/data: the one stats.json names and the newest older ones, so "
        "a training run or sweep still reading an earlier set keeps its files; a new preprocessing run deletes "
        "the oldest beyond this count. 1 = only the set in use (less disk, no reader of an older set survives).",
    )

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("an empty list: give at least one file, directory, glob or {path, weight}")
        if isinstance(v, str) and not v.strip():
            raise ValueError("empty: give a file, directory or glob")
        return v

    @model_validator(mode="after")
    def _pairs(self) -> DataConfig:
        return check_pair_data(self)

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
    cache_data: bool | Literal["auto"] = Field(
        "auto",
        description="Read the shards once into Ray's object store before training (faster start of each epoch); "
        "auto = when they take under a fifth of the cluster's object store.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How workers are placed on nodes (Ray placement group strategy): PACK fills as few nodes as "
        "possible; SPREAD spreads them where it can; STRICT_PACK one node; STRICT_SPREAD one node per worker.",
    )
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
    run_name: str | None = Field(
        None,
        description="Ray Train run name; unset = adapter_name. An unfinished run of this name is resumed; a "
        "finished one is kept and the new run is named NAME-2, NAME-3, ... (the first not finished).",
    )
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig, description="DPO or ORPO settings.")
    init_adapter: str | None = Field(
        None,
        min_length=1,
        description="Start from this LoRA adapter instead of a fresh one: a registered model (name:vN, name:ALIAS) "
        "or an adapter directory/URI. Its own settings replace the lora section; with DPO it is also the reference.",
    )
    resume: Literal["auto", "always", "never"] = Field(
        "auto",
        description="auto: continue an unfinished run only if its data, model, LoRA and optimisation settings are "
        "unchanged (else start NAME-2, ...); always: continue it whatever changed; never: always start a new run.",
    )

    @model_validator(mode="after")
    def _methods(self) -> TrainConfig:
        if self.method == "qlora" and not self.use_gpu:
            raise ValueError(
                "method 'qlora' quantizes the base model with bitsandbytes, which needs a CUDA GPU: set "
                "train.use_gpu=true on a GPU machine (install with the `gpu` extra), or use method 'lora' on CPU"
            )
        if self.mixed_precision == "fp16" and not self.use_gpu:
            raise ValueError("mixed_precision 'fp16' needs a GPU (train.use_gpu=true); on CPU use 'bf16' or 'no'")
        if self.init_adapter and (self.method == "full" or self.strategy == "fsdp"):
            raise ValueError(
                "init_adapter continues a LoRA adapter: it needs train.method lora or qlora and train.strategy ddp"
            )
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
    mode: Literal["min", "max"] = Field("min", description="Whether a lower (min) or higher (max) metric is better.")
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
    epochs: int | None = Field(
        None,
        ge=1,
        description="Epochs of each trial; unset = train.epochs. Shorter trials make a cheaper sweep that ranks "
        "values by how fast they learn; `aigc pipeline` then trains the best values for train.epochs.",
    )
    eval_every_steps: int | None = Field(
        None,
        ge=1,
        description="Each trial also evaluates and reports every N optimizer steps (ASHA's rungs, the curves' "
        "points); unset = train.eval_every_steps.",
    )
    name: str = Field("sweep", description="Experiment name under <output_dir>/sweep/.")


class ClusterConfig(_Section):
    num_cpus: int | None = Field(
        None,
        ge=1,
        description="Logical CPUs of the embedded local cluster; ignored when joining RAY_ADDRESS.",
    )


class PlatformConfig(_Section):
    """One run of the platform: every stage reads the section it needs."""

    output_dir: str = Field(
        "runs/demo",
        description="Where a run writes everything (local dir or s3:// gs://): data/ (stats.json, "
        "shards-<run>/{train,val,quarantine}), ray/ (checkpoints), adapter/, train/, sweep/, mlruns/, tensorboard/, "
        "pipeline/state.json.",
    )
    registry_dir: str = Field(
        "runs/registry",
        description="Where trained models are registered: <name>/v<N>/{adapter/, meta.json} (local dir or "
        "s3:// gs://).",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    data: DataConfig = Field(
        default_factory=DataConfig, description="`aigc preprocess`: raw rows to tokenized Parquet shards."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The LoRA adapter (train.method lora/qlora).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="`aigc train`: the Ray Train fine-tune.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="`aigc sweep`: the Ray Tune search.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow and TensorBoard.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="`aigc serve`: the OpenAI-compatible endpoint.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="The embedded local Ray cluster.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="`aigc pipeline`.")
    generate: GenerateConfig = Field(
        default_factory=GenerateConfig, description="`aigc generate` and `aigc eval`: the engine over a dataset."
    )

    @field_validator("output_dir", "registry_dir")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

"""What every training worker receives: the typed config sections and the facts the driver measured.

The driver (``aigc train``, or a sweep trial) builds one :class:`WorkerConfig` with :func:`build_worker_config`
and hands it to every worker; the sections travel as the validated pydantic objects (they pickle through Ray),
so no worker re-reads a dict or restates a default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from aigc.config import LoraConfig, ModelConfig, PlatformConfig, TrackingConfig, TrainConfig
from aigc.errors import DataError
from aigc.models.loading import load_tokenizer
from aigc.train.gen_metrics import take_generation_samples

__all__ = ["WorkerConfig", "build_worker_config"]


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker receives: the typed config sections plus facts the driver measured.

    Args:
        model, lora, train: the run's config sections, as validated objects.
        micro_per_epoch: micro-batches each worker trains on per epoch (from the row count).
        pad_id: the tokenizer's padding id.
        has_val: whether a ``val`` dataset shard exists.
        tokenizer: the run's tokenizer, loaded once on the driver (decodes generated answers).
        gen_samples: val prompts and reference answers for the generation metrics (the same list on every rank).
        tracking, output_dir, run_name, params: where rank 0 tracks the run (MLflow/TensorBoard) and what it logs
            as params; ``tracking`` None = no tracking.
        parent_run_id: the MLflow run this one is a child of (a sweep's run, for its trials).
        progress: where rank 0 sends its progress lines (the driver's :class:`aigc.train.progress.StepFeed`);
            None prints them to the worker's log.
    """

    model: ModelConfig
    lora: LoraConfig
    train: TrainConfig
    micro_per_epoch: int
    pad_id: int
    has_val: bool
    tokenizer: Any = None
    gen_samples: tuple[Any, ...] = ()
    tracking: TrackingConfig | None = None
    output_dir: str = ""
    run_name: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    parent_run_id: str | None = None
    progress: Any = None

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: the last, shorter accumulation group of an epoch is a step too."""
        return max(1, math.ceil(self.micro_per_epoch / self.train.grad_accum))

    @property
    def total_steps(self) -> int:
        return self.train.epochs * self.steps_per_epoch


def build_worker_config(
    cfg: PlatformConfig,
    datasets: dict[str, Any],
    rows_train: int,
    num_workers: int,
    *,
    run_name: str,
    tokenizer: Any = None,
    gen_samples: list[Any] | None = None,
    parent_run_id: str | None = None,
    progress: Any = None,
) -> WorkerConfig:
    """The :class:`WorkerConfig` of a run of ``cfg`` on ``num_workers`` workers.

    Each worker's shard holds ``rows_train // num_workers`` rows (Ray Train splits datasets into equal shards).
    The tokenizer is loaded here once (unless given) and shipped to the workers; with
    ``train.eval_generation_samples``, the first val rows become the prompts of the generation metrics (unless
    ``gen_samples`` gives them: a sweep takes them once for all its trials). ``parent_run_id``: the MLflow run
    the run is tracked under (a sweep's). ``progress``: where rank 0 sends its step lines (a ``StepFeed.sink``).

    Raises:
        DataError: fewer training rows than workers.
    """
    tok = tokenizer or load_tokenizer(cfg.model.load_path(), cfg.model.trust_remote_code)
    rows_per_worker = rows_train // num_workers
    if rows_per_worker < 1:
        raise DataError(f"{rows_train} training rows cannot feed {num_workers} workers: use fewer train.num_workers")
    n = cfg.train.eval_generation_samples
    samples = gen_samples[:n] if gen_samples is not None else take_generation_samples(datasets, n)
    tracked = cfg.tracking.mlflow or cfg.tracking.tensorboard
    return WorkerConfig(
        model=cfg.model,
        lora=cfg.lora,
        train=cfg.train,
        micro_per_epoch=math.ceil(rows_per_worker / cfg.train.batch_size),
        pad_id=tok.pad_token_id,
        has_val="val" in datasets,
        tokenizer=tok,
        gen_samples=tuple(samples),
        tracking=cfg.tracking if tracked else None,
        output_dir=cfg.output_dir,
        run_name=run_name,
        params=cfg.model_dump(exclude={"serve", "tune", "cluster", "tracking"}),  # MLflow params, flattened
        parent_run_id=parent_run_id,
        progress=progress,
    )

"""What ``aigc train`` checks before any Ray work: the strategy fits the hardware, LoRA's target modules exist in
the model, ``data.max_length`` fits its context and the shards were tokenized for it."""

from __future__ import annotations

from aigc.config import PlatformConfig
from aigc.data.checks import check_max_length
from aigc.data.preprocess import check_tokenized_for, read_stats
from aigc.models.hub import resolve_model
from aigc.models.targets import check_target_modules
from aigc.train.model_setup import check_strategy

__all__ = ["check"]


def check(cfg: PlatformConfig, *, preprocessed: bool = True) -> PlatformConfig:
    """Check a training run; returns ``cfg`` with its model resolved (tokenizer and config only: the weights
    come with :func:`aigc.models.hub.resolve_model` once every stage's checks passed).

    Args:
        preprocessed: the shards must exist already (False: a pipeline or the demo preprocesses first).

    Raises:
        ConfigError: a strategy the hardware cannot run, target modules the model lacks, a too long max_length.
        DataError: no shards under ``output_dir``, or shards tokenized for another model.
        ModelUnavailableError: the model cannot be had.
    """
    check_strategy(cfg.train)
    cfg = cfg.model_copy(update={"model": resolve_model(cfg.model, weights=False)})
    check_max_length(cfg)
    if cfg.train.method != "full":
        check_target_modules(cfg.model, cfg.lora)
    if preprocessed:
        check_tokenized_for(read_stats(cfg.output_dir), cfg.model, cfg.output_dir)
    return cfg

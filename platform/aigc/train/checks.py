"""What ``aigc train`` checks before any Ray work: the strategy fits the hardware, LoRA's target modules exist in
the model, ``data.max_length`` fits its context and the shards were tokenized for it."""

from __future__ import annotations

from aigc.config import PlatformConfig
from aigc.data.checks import check_max_length
from aigc.data.preprocess import check_tokenized_for, read_stats
from aigc.errors import ConfigError, DataError
from aigc.models.hub import resolve_model
from aigc.models.targets import check_target_modules
from aigc.train.model_setup import check_strategy

__all__ = ["check", "check_preference"]


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
    check_preference(cfg)
    cfg = cfg.model_copy(update={"model": resolve_model(cfg.model, weights=False)})
    check_max_length(cfg)
    if cfg.train.method != "full":
        check_target_modules(cfg.model, cfg.lora)
    if preprocessed:
        stats = read_stats(cfg.output_dir)
        check_tokenized_for(stats, cfg.model, cfg.output_dir)
        if bool(stats.get("preference")) != cfg.data.preference:
            kind = "preference pairs" if stats.get("preference") else "supervised rows"
            setting = f"data.preference={str(cfg.data.preference).lower()}"
            raise DataError(f"the preprocessed data under {cfg.output_dir} holds {kind}, but {setting}: re-run "
                            "`aigc preprocess` with this config")  # fmt: skip
    return cfg


def check_preference(cfg: PlatformConfig) -> None:
    """DPO/ORPO train on preference pairs, and SFT on supervised rows; DPO's reference needs LoRA.

    Raises:
        ConfigError: naming the setting to change.
    """
    method = cfg.train.preference.method
    if method and not cfg.data.preference:
        raise ConfigError(f"train.preference.method={method} trains on preference pairs: set data.preference=true "
                          "and give rows with `chosen` and `rejected` answers")  # fmt: skip
    if cfg.data.preference and not method:
        raise ConfigError("data.preference=true gives preference pairs, which supervised fine-tuning cannot use: set "
                          "train.preference.method=dpo or orpo")  # fmt: skip
    if method == "dpo" and cfg.train.strategy == "fsdp":  # the reference pass runs the unwrapped (sharded) module
        raise ConfigError(
            "train.preference.method=dpo runs with train.strategy=ddp only (its reference pass needs "
            "whole weights on each worker): set train.strategy=ddp, or use train.preference.method=orpo"
        )
    if method == "dpo" and cfg.train.method == "full":
        raise ConfigError(
            "train.preference.method=dpo takes its reference from the base model with the adapters "
            "disabled: use train.method=lora or qlora, or train.preference.method=orpo (no reference)"
        )

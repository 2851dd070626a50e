"""What ``aigc pipeline`` checks before any Ray work: the stages fit together, then each stage it runs as that
stage's own command checks it (:mod:`aigc.data.checks`, :mod:`aigc.train.checks`, :mod:`aigc.tune.checks`,
:mod:`aigc.serve.checks`), on the data the pipeline reads (``data.path`` plus ``pipeline.feedback``)."""

from __future__ import annotations

from aigc import storage
from aigc.config import PlatformConfig
from aigc.config.pipeline import parse_gate
from aigc.data import checks as data_checks
from aigc.errors import ConfigError, DataError
from aigc.pipeline.feedback_round import pipeline_config
from aigc.serve import checks as serve_checks
from aigc.train import checks as train_checks
from aigc.tune import checks as tune_checks

__all__ = ["check", "check_pipeline"]


def check_pipeline(cfg: PlatformConfig) -> None:
    """What the schema cannot check: the stages fit together, the feedback file exists.

    Raises:
        ConfigError: ``pipeline.deploy`` with ``train.method=full`` (the app serves adapters on its base model; a
            full fine-tune is served as a base model of its own).
        ConfigError: a DPO feedback round whose sweep searches the adapter's shape (``lora.*``).
        ConfigError: ``pipeline.promote_if`` without ``generate.input`` (the held-out prompts it evaluates on), or
            on the judge's win rate without ``generate.judge.url``.
        DataError: ``pipeline.feedback`` or ``generate.input`` (for the gate) names no file.
    """
    if cfg.pipeline.deploy and cfg.train.method == "full":
        raise ConfigError(
            "pipeline.deploy: the app serves LoRA adapters on model.name_or_path, and train.method=full trains a "
            "whole model; set pipeline.deploy=false and serve the registered model as a base model "
            "(aigc serve model.name_or_path=<its registry path> serve.base_model_id=<name:vN>)"
        )
    p = cfg.pipeline
    if p.feedback and p.feedback_method == "dpo" and p.sweep:
        from aigc.tune.space import load_space

        space = load_space(cfg.tune.space, cfg)
        searched = [x.key for x in space.params if x.key.startswith("lora.")]
        if searched:
            raise ConfigError(
                f"pipeline.feedback_method=dpo continues the served adapter, whose shape is fixed, but tune.space "
                f"{space.source} searches {', '.join(searched)}: set pipeline.sweep=false or a space without lora keys"
            )
    if p.promote_if:
        _check_gate(cfg)
    if cfg.pipeline.feedback and not storage.is_file(cfg.pipeline.feedback):
        raise DataError(
            f"pipeline.feedback: no such file {cfg.pipeline.feedback}; write it with `aigc feedback export "
            f"--output {cfg.pipeline.feedback}` (or drop pipeline.feedback)"
        )


def _check_gate(cfg: PlatformConfig) -> None:
    p, g = cfg.pipeline, cfg.generate
    if not g.input:
        raise ConfigError(
            f"pipeline.promote_if={p.promote_if!r} evaluates the new version on held-out prompts: set generate.input "
            "to a held-out dataset (any format aigc preprocess reads), never the training data"
        )
    if not storage.exists(g.input):
        raise DataError(f"generate.input: no such file or directory {g.input} (the held-out prompts of the gate)")
    if parse_gate(p.promote_if).metric == "judge_win_rate" and (g.judge is None or not g.judge.url):
        raise ConfigError("pipeline.promote_if on eval.judge_win_rate needs a judge: set generate.judge.url (an "
                          "OpenAI-compatible endpoint) and generate.judge.model")  # fmt: skip


def check(cfg: PlatformConfig) -> PlatformConfig:
    """Check a pipeline run; returns ``cfg`` with its model resolved (tokenizer and config only).

    Raises:
        ConfigError, DataError, ModelUnavailableError: from :func:`check_pipeline` or a stage's check.
    """
    check_pipeline(cfg)
    run = pipeline_config(cfg)
    if run.pipeline.deploy:  # no keys on a public address: refuse before anything slower
        run = serve_checks.check(run)
    run = data_checks.check(run)
    run = (tune_checks if run.pipeline.sweep else train_checks).check(run, preprocessed=False)
    return cfg.model_copy(update={"model": run.model})

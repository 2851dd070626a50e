"""The ``aigc`` subcommands that run a stage on a Ray cluster, as a table: what each runs and what it checks first.

Each stage's ``check(cfg)`` (:mod:`aigc.data.checks`, :mod:`aigc.train.checks`, ...) runs before any Ray work,
so bad config or input fails in seconds with exit status 2 (or 1 for bad data); then the base model is
resolved once, with its weights where the stage loads them (:mod:`aigc.models.hub`), and only then does Ray start.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from aigc.config import PlatformConfig

__all__ = ["STAGES", "Stage", "check_stage", "run_stage"]


@dataclass(frozen=True)
class Stage:
    """One stage subcommand: ``run`` it after ``checks``'s ``check(cfg)`` passed (a module path, or
    ``module:function``, imported only when the stage runs, so that ``aigc --help`` stays fast)."""

    help: str
    run: Callable[[PlatformConfig], None]
    checks: str
    weights: bool = True  # the stage loads the model's weights (preprocessing needs only the tokenizer)
    joins_cluster: bool = True  # run_stage starts or joins Ray first; False: the stage does it itself, when ready
    # The stage's own options beyond --config, and the overrides they stand for (`aigc eval --models a b`).
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    overrides: Callable[[argparse.Namespace], list[str]] | None = None


def _preprocess(cfg: PlatformConfig) -> None:
    from aigc.data.preprocess import preprocess
    from aigc.report import report_preprocess

    report_preprocess(preprocess(cfg.data, cfg.model, cfg.output_dir))


def _train(cfg: PlatformConfig) -> None:
    from aigc.report import report_train
    from aigc.train.trainer import run_training

    report_train(run_training(cfg))


def _sweep(cfg: PlatformConfig) -> None:
    from aigc.report import report_sweep
    from aigc.tune.sweep import run_sweep

    report_sweep(run_sweep(cfg))


def _serve(cfg: PlatformConfig) -> None:
    from aigc.cluster import in_submitted_job
    from aigc.serve.run import run_server

    # As a Ray job (`aigc submit serve`, `ray job submit -- python jobs/serve.py`) nobody can press Ctrl-C:
    # deploy, wait until healthy and return. Serve's actors outlive the job, so the app keeps serving.
    detached = in_submitted_job()
    run_server(cfg, blocking=not detached)
    if detached:
        print("[serve] the app keeps running on the cluster after this job; `serve shutdown` stops it")


def _demo(cfg: PlatformConfig) -> None:
    from aigc.demo.driver import run_demo

    run_demo(cfg)


def _demo_preference(cfg: PlatformConfig) -> None:
    from aigc.demo.preference_round import run_preference_demo

    run_preference_demo(cfg)


def _pipeline(cfg: PlatformConfig) -> None:
    from aigc.pipeline import run_pipeline

    run_pipeline(cfg, block=cfg.pipeline.keep_serving)


def _generate(cfg: PlatformConfig) -> None:
    from aigc.batch import run_generate

    run_generate(cfg)


def _eval(cfg: PlatformConfig) -> None:
    from aigc.batch.evaluate import eval_dir, eval_table, run_eval

    report = run_eval(cfg, list(cfg.generate.eval_models))
    print(eval_table(report))
    print(f"[eval] {eval_dir(cfg)}/report.json, {eval_dir(cfg)}/eval.png")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="base, name, name:vN, name@vN or name:ALIAS; the first is the reference "
                   "(default: generate.eval_models)")  # fmt: skip


def _eval_overrides(args: argparse.Namespace) -> list[str]:
    # `--models a b k=v`: argparse hands the overrides after the models to --models; no model has a '='.
    models = [m for m in args.models or () if "=" not in m]
    extra = [m for m in args.models or () if "=" in m]
    return [*extra, *([f"generate.eval_models={json.dumps(models)}"] if models else [])]


STAGES: dict[str, Stage] = {
    "preprocess": Stage("raw data -> validated, tokenized Parquet shards (Ray Data)", _preprocess,
                        "aigc.data.checks", weights=False),
    "train": Stage("LoRA (or full) fine-tune on the shards (Ray Train); registers the adapter", _train,
                   "aigc.train.checks"),
    "sweep": Stage("hyperparameter search, each trial a training run (Ray Tune)", _sweep, "aigc.tune.checks"),
    "serve": Stage("the OpenAI-compatible endpoint with autoscaling replicas (Ray Serve)", _serve,
                   "aigc.serve.checks"),
    "demo": Stage("preprocess -> fine-tune -> sweep -> serve -> chat, on the tiny model", _demo, "aigc.demo.driver"),
    "demo-preference": Stage("SFT -> serve -> rated answers -> pairs -> DPO -> eval, on the tiny model",
                             _demo_preference, "aigc.demo.preference_round"),
    # joins the cluster itself, once it holds its output_dir's lock (aigc.pipeline.lock)
    "pipeline": Stage("preprocess -> sweep -> train -> register -> serve, resumable", _pipeline,
                      "aigc.pipeline.checks", joins_cluster=False),
    "generate": Stage("the serving engine over a dataset: answers as JSONL/Parquet, resumable (Ray Data)", _generate,
                      "aigc.batch.checks"),
    "eval": Stage("several models on the same held-out prompts: a table, a plot and report.json", _eval,
                  "aigc.batch.checks:check_eval", arguments=_eval_arguments, overrides=_eval_overrides),
}  # fmt: skip


def check_stage(stage: str, cfg: PlatformConfig) -> PlatformConfig:
    """The stage's checks (no cluster), then its base model resolved once (a hub id pinned to one commit and
    downloaded once, here, with the weights where the stage loads them); returns ``cfg`` with that model."""
    from aigc.models.hub import resolve_model

    entry = STAGES[stage]
    module, _, function = entry.checks.partition(":")
    checked = getattr(importlib.import_module(module), function or "check")(cfg)
    return cfg.model_copy(update={"model": resolve_model(checked.model, weights=entry.weights)})


def run_stage(stage: str, cfg: PlatformConfig) -> None:
    """Check the inputs, join or start the Ray cluster and run one stage (what ``jobs/<stage>.py`` calls).

    Raises:
        AigcError: bad config or input (detected before the cluster starts), or a stage that failed.
    """
    from aigc.cluster import init_ray

    cfg = check_stage(stage, cfg)
    if STAGES[stage].joins_cluster:
        init_ray(cfg.cluster.num_cpus)
    STAGES[stage].run(cfg)

"""Hyperparameter sweeps: a Ray Tune experiment whose trials train with the same loop as ``aigc train``.

``run_sweep(cfg)``:

1. checks the space, the search, the metric and the concurrency before any trial starts (ConfigError);
2. reads the preprocessed shards once into the object store, and loads the tokenizer and takes the
   generation-metric prompts once, shared by every trial; opens the sweep's parent MLflow run
   (:mod:`aigc.tune.tracking`, with ``tracking.mlflow``) whose children are the trials' runs;
3. runs the trials (:mod:`aigc.tune.trial`) with ``tune.search`` and ``tune.scheduler``, as many at a time
   as the cluster fits; re-running the same command after the driver died continues the sweep
   (finished trials are kept, unfinished ones resume from their checkpoints) when its data, model, space and
   settings are unchanged (:mod:`aigc.train.run_choice`, as for ``aigc train``); a sweep that finished, or
   one started on other inputs, is kept and the next run gets a fresh numbered name (``sweep-2``);
4. writes ``<output_dir>/sweep/``: ``trials.csv``, ``curves.png``, ``params.png``, ``best_config.yaml`` (also
   the parent run's artifacts) and ``best_adapter/``, registered with the sweep's id in its config
   (``sweep.id``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from aigc import storage
from aigc.config import PlatformConfig
from aigc.console import StageLine
from aigc.data.preprocess import dataset_rows, read_stats
from aigc.data.shard_sets import cache_datasets, load_datasets
from aigc.errors import ConfigError, TrainingError
from aigc.models.hub import resolve_model
from aigc.models.loading import load_tokenizer
from aigc.train.gen_metrics import take_generation_samples
from aigc.train.init_adapter import resolve_init_adapter
from aigc.train.publish import publish
from aigc.train.run_choice import DONE_MARKER, RunChoice, choose_run, record_run, run_inputs
from aigc.train.tracking import Tracker
from aigc.tune.concurrency import plan_concurrency
from aigc.tune.progress import SweepProgress
from aigc.tune.results import best_config, best_config_yaml, plot_curves, plot_params, trials_table
from aigc.tune.search import build_scheduler, build_search, check_sweep, max_reports, trial_base, trial_count
from aigc.tune.space import Space, resolve, to_param_space
from aigc.tune.state_guard import StateGuard, repair_state
from aigc.tune.tracking import finish_sweep_run, open_sweep_run
from aigc.tune.trial import run_trial, trial_resources

__all__ = ["SweepResult", "build_tuner", "choose_sweep", "run_sweep", "sweep_inputs"]


@dataclass
class SweepResult:
    """What a sweep found and where it wrote it."""

    sweep_id: str
    best_overrides: dict[str, Any]
    best_metrics: dict[str, Any]
    adapter_dir: str
    registry_id: str | None
    trials: Any  # pandas.DataFrame, best first
    best_config_path: str = ""
    plots: list[str] = field(default_factory=list)


def sweep_inputs(cfg: PlatformConfig, space: Space, stats: dict[str, Any]) -> dict[str, Any]:
    """What decides a sweep: the trials' base run (:func:`aigc.train.run_choice.run_inputs`), the space and
    the search settings."""
    tune = cfg.tune.model_dump(mode="json", exclude={"name", "space"})  # the space by content, not path
    return run_inputs(cfg, stats) | {"tune": tune, "space": [dataclasses.asdict(p) for p in space.params]}


def choose_sweep(cfg: PlatformConfig, space: Space, stats: dict[str, Any]) -> RunChoice:
    """``tune.name`` continued when it is unfinished and its inputs are unchanged; else the next ``NAME-N``
    (``cfg``: the trials' base config, :func:`aigc.tune.search.trial_base`)."""
    return choose_run(storage.join(cfg.output_dir, "sweep"), cfg.tune.name, sweep_inputs(cfg, space, stats),
                      cfg.train.resume)  # fmt: skip


def _shared_datasets(cfg: PlatformConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shards, read once into the object store when they fit (``train.cache_data``): every trial then
    iterates the same blocks; data too large to cache is streamed by each trial."""
    datasets, stats = load_datasets(cfg.output_dir, cfg.model)
    return cache_datasets(datasets, stats, cfg.train.cache_data), stats


def build_tuner(
    cfg: PlatformConfig,
    space: Space,
    datasets: dict[str, Any],
    rows_train: int,
    *,
    name: str,
    at_once: int,
    trials: int,
    callbacks: list[Any] | None = None,
    tokenizer: Any = None,
    gen_samples: list[Any] | None = None,
    parent_run_id: str | None = None,
    line: StageLine | None = None,
) -> Any:
    """A Tuner for the experiment ``<output_dir>/sweep/<name>``; restored when that experiment exists.

    Args:
        cfg: the trials' base config (:func:`aigc.tune.search.trial_base`).
        tokenizer, gen_samples: loaded once here and handed to every trial (None: each trial loads its own).
        parent_run_id: the sweep's MLflow run, the parent of the trials' runs.
        line: the stage line the trials' progress is drawn on (None: plain lines).
    """
    import ray.tune

    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            run_trial,
            base=cfg,
            space=space,
            datasets=datasets,
            rows_train=rows_train,
            tokenizer=tokenizer,
            gen_samples=gen_samples,
            parent_run_id=parent_run_id,
        ),  # fmt: skip
        trial_resources(cfg),
    )
    path = storage.join(cfg.output_dir, "sweep", name)
    ray_path, fs = storage.filesystem_for_ray(path)
    repaired = repair_state(path)  # a driver killed while Tune wrote its state: the last good copy
    if repaired:
        print(f"[sweep] {', '.join(repaired)} was torn by the kill: continuing from its last good copy", flush=True)
    if ray.tune.Tuner.can_restore(ray_path, storage_filesystem=fs):
        return ray.tune.Tuner.restore(ray_path, trainable, resume_errored=True, storage_filesystem=fs)

    param_space = to_param_space(space, grid_as_choice=cfg.tune.search == "grid")
    search_alg, param_space = build_search(cfg, param_space, at_once)
    sweep_storage, sweep_fs = storage.filesystem_for_ray(storage.join(cfg.output_dir, "sweep"))
    t = cfg.tune
    return ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            num_samples=1 if t.search == "grid" else t.num_samples,
            max_concurrent_trials=None if search_alg is not None else at_once,  # else the search limits it
            search_alg=search_alg,
            # A trial process that ended is handed the next trial: torch, transformers and peft are imported
            # once per process, not once per trial (the largest part of a small trial's start-up).
            reuse_actors=True,
            scheduler=build_scheduler(cfg, max_reports(cfg, space, rows_train), space),
        ),
        run_config=ray.tune.RunConfig(
            name=name,
            storage_path=sweep_storage,
            storage_filesystem=sweep_fs,
            verbose=0,  # a live line (SweepProgress) instead of Tune's tables
            callbacks=[SweepProgress(t.metric, trials, line), *(callbacks or [])],
            # The last checkpoint is always kept (resume); the best by the metric too (publishing). PBT keeps
            # them all: a trial that exploits another takes over its checkpoint, and pruning either trial's
            # checkpoints would delete the other's (Tune tracks the shared directory in both).
            checkpoint_config=ray.tune.CheckpointConfig(
                num_to_keep=None if t.scheduler == "pbt" else cfg.train.keep_checkpoints,
                checkpoint_score_attribute=t.metric,
                checkpoint_score_order=t.mode,
            ),
        ),
    )


def _best_checkpoint(best: Any, cfg: PlatformConfig) -> Any:
    """The best trial's last checkpoint: Tune's own (1-worker trials) or its Train run's (``checkpoint_path``)."""
    import ray.train

    if best.checkpoint is not None:
        return best.checkpoint
    path = best.metrics["checkpoint_path"]
    if storage.is_uri(path):
        fs, inner = storage.filesystem(path)
        return ray.train.Checkpoint(inner, filesystem=fs)
    _, fs = storage.filesystem_for_ray(storage.join(cfg.output_dir, "sweep"))
    return ray.train.Checkpoint(path, filesystem=fs)


def run_sweep(cfg: PlatformConfig, register: bool = True, *, callbacks: list[Any] | None = None) -> SweepResult:
    """Run (or continue) the sweep, write its tables, plots and best config, and publish the best trial.

    Args:
        callbacks: more Tune callbacks (tests use one to interrupt the driver).

    Raises:
        ConfigError: a bad space, search, metric, a trial the cluster cannot fit, or a PBT population larger
            than the trials that fit at once (before any trial starts).
        DataError: preprocessing has not run for ``output_dir``.
        TrainingError: no trial reported ``tune.metric`` with a checkpoint.
    """
    import ray

    space = check_sweep(cfg)
    # once, here: every trial loads this snapshot and the registry records its commit
    cfg = cfg.model_copy(update={"model": resolve_model(cfg.model, weights=True)})
    cfg = resolve_init_adapter(cfg)
    searched = [p.key for p in space.params if p.key.startswith("lora.")]
    if cfg.train.init_adapter and searched:
        raise ConfigError(
            f"tune.space {space.source} searches {', '.join(searched)}, but train.init_adapter fixes the adapter's "
            "shape: search other keys (train.lr, train.preference.beta, ...) or unset train.init_adapter"
        )
    cfg = trial_base(cfg)  # the trials' epochs and evaluations (tune.epochs, tune.eval_every_steps)
    stats = read_stats(cfg.output_dir)  # fail before any cluster work if preprocessing has not run
    plan = plan_concurrency(cfg, trial_count(cfg, space), ray.cluster_resources())
    if cfg.tune.scheduler == "pbt" and plan.at_once < plan.trials:
        raise ConfigError(
            f"tune.scheduler=pbt: the population of {plan.trials} trials must train side by side (a trial exploits "
            f"a running one), but {plan.at_once} fit at once; lower tune.num_samples to {plan.at_once}, or raise "
            "tune.max_concurrent_trials or the cluster's CPUs"
        )
    sweep_dir = storage.join(cfg.output_dir, "sweep")
    choice = choose_sweep(cfg, space, stats)
    record_run(sweep_dir, choice)
    name = choice.name
    print(f"[sweep] {choice.message}: {plan.line()}", flush=True)

    datasets, stats = _shared_datasets(cfg)  # stats as the shards were read (the same file as above)
    rows = dataset_rows(stats, "train")
    parent = open_sweep_run(cfg, name, space)
    try:
        with StageLine("sweep", total=plan.trials) as line:
            tuner = build_tuner(
                cfg, space, datasets, rows, name=name, at_once=plan.at_once, trials=plan.trials,
                callbacks=callbacks, parent_run_id=parent.run_id, line=line,
                **_shared_trial_inputs(cfg, space, datasets),
            )  # fmt: skip
            with StateGuard(storage.join(sweep_dir, name)):  # a good copy of Tune's state, for a kill mid-write
                grid = tuner.fit()
        results = list(grid)
        t = cfg.tune
        try:
            best = grid.get_best_result(metric=t.metric, mode=t.mode, scope="last", filter_nan_and_inf=True)
        except RuntimeError:  # Tune's "no best trial found": no trial reported the metric
            best = None
        if best is None or best.metrics is None or t.metric not in best.metrics:
            errors = [str(r.error).splitlines()[0] for r in results if r.error]
            raise TrainingError(
                f"no sweep trial reported {t.metric!r}; first errors: {errors[:3]}. "
                f"Trial logs are under {storage.join(sweep_dir, name)}"
            )
        return _finish(cfg, space, results, best, name, stats, register, parent)
    except BaseException as exc:
        # an interrupted driver (Ctrl-C) leaves the run KILLED; re-running the sweep continues it
        parent.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


def _shared_trial_inputs(cfg: PlatformConfig, space: Space, datasets: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer and the generation-metric prompts, loaded once for every trial (each trial would otherwise
    load the tokenizer and run a Ray Data ``take`` on the val split). Not when the space changes them."""
    keys = space.keys
    tokenizer = None
    if not any(k.startswith("model.") for k in keys):
        tokenizer = load_tokenizer(cfg.model.load_path(), cfg.model.trust_remote_code)
    samples = None
    if "train.eval_generation_samples" not in keys:
        samples = take_generation_samples(datasets, cfg.train.eval_generation_samples)
    return {"tokenizer": tokenizer, "gen_samples": samples}


def _finish(cfg: PlatformConfig, space: Space, results: list[Any], best: Any, name: str, stats: dict[str, Any],
            register: bool, parent: Tracker) -> SweepResult:  # fmt: skip
    """Table, CSV, plots, best config file, the parent MLflow run's summary, published adapter, completion
    marker."""
    sweep_dir = storage.join(cfg.output_dir, "sweep")
    values = resolve(space, best.config)
    table = trials_table(results, space, cfg, best.path)
    chosen = best_config(cfg, values)
    sweep_id = f"{name}@{storage.join(sweep_dir, name)}"
    files = ("trials.csv", "curves.png", "params.png", "best_config.yaml")
    with storage.local_staging(sweep_dir) as local:
        table.to_csv(os.path.join(local, files[0]), index=False)
        plot_curves(results, space, cfg.tune.metric, os.path.join(local, files[1]))
        plot_params(table, space, cfg.tune.metric, os.path.join(local, files[2]))
        with open(os.path.join(local, files[3]), "w") as f:
            f.write(best_config_yaml(chosen, sweep_id, values))
        best_summary = {"trial_id": best.metrics.get("trial_id"), "values": values, "metrics": best.metrics}
        finish_sweep_run(parent, cfg.tune.metric, best_summary, [os.path.join(local, x) for x in files])
    plots = [storage.join(sweep_dir, "curves.png"), storage.join(sweep_dir, "params.png")]
    config_path = storage.join(sweep_dir, "best_config.yaml")

    published = publish(
        chosen,
        _best_checkpoint(best, cfg),
        storage.join(sweep_dir, "best_adapter"),
        register=register,
        extra_config={"sweep": {"id": sweep_id, "values": values, "trial_id": best.metrics.get("trial_id")}},
        data_hash=stats.get("fingerprint"),
    )
    done = {"best": values, "adapter_dir": published.model_dir, "registry_id": published.registry_id}
    storage.write_json(storage.join(sweep_dir, name, DONE_MARKER), done)
    return SweepResult(
        sweep_id, values, published.metrics, published.model_dir, published.registry_id, table, config_path, plots
    )

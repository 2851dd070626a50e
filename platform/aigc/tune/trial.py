"""One sweep trial: the base config with the trial's values, trained by the same loop as ``aigc train``.

Two ways to run it, chosen by ``tune.num_workers_per_trial``:

- **1 worker** (the default): the trial process runs :func:`~aigc.train.loop.run_worker` itself
  with a :class:`~aigc.train.context.TuneTrialContext`. No Train controller, no worker group, one checkpoint
  copy; the trial reserves the worker's CPUs (and GPU).
- **N workers**: the Train V2 driver pattern. The trial (a quarter CPU) fits a TorchTrainer whose workers
  hold the resources, and ``TuneReportCallback`` forwards their reports to Tune.

Either way the datasets arrive already materialized in the object store (read once by the sweep driver).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aigc import storage
from aigc.config import PlatformConfig, with_values
from aigc.errors import TrainingError
from aigc.tune.space import Space, resolve

if TYPE_CHECKING:
    from aigc.train.context import WorkerContext
    from aigc.train.worker_config import WorkerConfig

# aigc.train's modules (torch, transformers) are imported inside the functions below, not here: a trial
# process's first trial then counts their import in its set-up (``trial_imports_config_s``), where it belongs.

__all__ = ["DRIVER_CPUS", "trial_resources", "run_trial"]

# A multi-worker trial's own process only waits on its TorchTrainer; the Train workers hold the real CPUs/GPUs.
DRIVER_CPUS = 0.25


def trial_resources(cfg: PlatformConfig) -> dict[str, float]:
    """What Tune reserves for the trial process itself (a 1-worker trial is the worker)."""
    t = cfg.train
    if cfg.tune.num_workers_per_trial == 1:
        return {"cpu": t.cpus_per_worker, **({"gpu": 1} if t.use_gpu else {})}
    return {"cpu": DRIVER_CPUS}


def run_trial(config: dict[str, Any], base: PlatformConfig, space: Space, datasets: dict[str, Any],
              rows_train: int, tokenizer: Any = None, gen_samples: list[Any] | None = None,
              parent_run_id: str | None = None) -> None:  # fmt: skip
    """Tune's trainable: ``config`` holds the sampled values (conditional keys as hidden factors).

    Args:
        tokenizer, gen_samples: loaded and taken once by the sweep driver (None: each trial does it).
        parent_run_id: the sweep's MLflow run; each trial's run is its child.

    Raises:
        TrainingError: the loss became NaN or infinite (the trial is marked errored, naming the step).
    """
    t0 = time.perf_counter()
    from aigc.train.loop import NONFINITE_KEY

    cfg = with_values(base, resolve(space, config))
    shared = {"tokenizer": tokenizer, "gen_samples": gen_samples, "parent_run_id": parent_run_id}
    if cfg.tune.num_workers_per_trial == 1:
        out = _train_in_trial(cfg, datasets, rows_train, t0, shared)
    else:
        out = _train_with_workers(cfg, datasets, rows_train, shared)
    if isinstance(out, dict) and NONFINITE_KEY in out:
        raise TrainingError(f"trial loss became NaN or infinite at step {out[NONFINITE_KEY]}; lower train.lr")


def _train_in_trial(cfg: PlatformConfig, datasets: dict[str, Any], rows_train: int, t0: float,
                    shared: dict[str, Any]) -> Any:  # fmt: skip
    import ray.data
    import ray.tune

    from aigc.train.context import TuneTrialContext
    from aigc.train.loop import run_worker
    from aigc.train.worker_config import build_worker_config

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # same batches on a resume
    name = f"trial_id={ray.tune.get_context().get_trial_id()}"
    t_config = time.perf_counter()
    wc = build_worker_config(cfg, datasets, rows_train, 1, run_name=name, **shared)
    phases = {"imports_config": t_config - t0, "tokenizer_samples": time.perf_counter() - t_config}
    ctx = _TimedContext(TuneTrialContext(datasets, cfg.train.use_gpu), t0, phases, name)
    return run_worker(wc, ctx)


class _TimedContext:
    """Times a trial's set-up and adds it to the first report: ``trial_setup_s`` (trial start to the first
    report, less training) and ``trial_<phase>_s`` for its phases, also printed as one line: ``imports_config``
    (the loop's imports, torch and transformers in a fresh trial process, and the trial's config),
    ``tokenizer_samples`` (0 when the sweep shares them), ``model`` (build, LoRA wiring) and
    ``evals_restore`` (everything else up to the first report but the training steps: a checkpoint restore,
    the base model's evaluation, starting the data iterators, and the first report's own evaluation, generation
    metrics included, and checkpoint)."""

    def __init__(self, inner: WorkerContext, t0: float, phases: dict[str, float], name: str) -> None:
        self._inner, self._t0, self._first, self._name = inner, t0, True, name
        self._phases, self._mark = dict(phases), t0 + sum(phases.values())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def prepare_model(self, model: Any, wc: WorkerConfig) -> Any:
        out = self._inner.prepare_model(model, wc)
        now = time.perf_counter()
        self._phases["model"], self._mark = now - self._mark, now  # the loop builds the model just before
        return out

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if self._first:
            self._first = False
            now, trained = time.perf_counter(), metrics["train_time_s"]
            # train_time_s ends where the report's evaluation begins: that evaluation and the checkpoint count here
            self._phases["evals_restore"] = now - self._mark - trained
            setup = now - self._t0 - trained
            metrics = {**metrics, "trial_setup_s": round(setup, 2),
                       **{f"trial_{k}_s": round(v, 2) for k, v in self._phases.items()}}  # fmt: skip
            parts = ", ".join(f"{k} {v:.1f}" for k, v in self._phases.items())
            print(f"[trial] {self._name} set-up {setup:.1f} s: {parts}", flush=True)
        self._inner.report(metrics, checkpoint_dir)


def _train_with_workers(cfg: PlatformConfig, datasets: dict[str, Any], rows_train: int,
                        shared: dict[str, Any]) -> Any:  # fmt: skip
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from aigc.train.trainer import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    trainer = build_trainer(
        cfg,
        datasets,
        rows_train,
        name=f"trial_id={trial_id}",
        storage_path=storage.join(cfg.output_dir, "sweep", "trials"),
        num_workers=cfg.tune.num_workers_per_trial,
        callbacks=[TuneReportCallback()],
        **shared,
    )
    return trainer.fit().return_value

"""How many trials run side by side, from the cluster's resources and what one trial needs.

A trial needs its workers' CPUs (``tune.num_workers_per_trial x train.cpus_per_worker``), plus the trial
driver's quarter CPU when it runs a worker group, and a GPU per worker with ``train.use_gpu``. One CPU stays
free for the Ray Data tasks that feed the trials: a cluster filled with trials would starve its own reads.
A trial that could never fit fails now instead of waiting PENDING forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aigc.config import PlatformConfig
from aigc.errors import ConfigError
from aigc.tune.trial import DRIVER_CPUS

__all__ = ["ConcurrencyPlan", "plan_concurrency"]

_DATA_CPUS = 1.0


@dataclass(frozen=True)
class ConcurrencyPlan:
    trials: int
    at_once: int
    workers_per_trial: int
    cpus_per_trial: float
    gpus_per_trial: int

    def line(self) -> str:
        """``4 trials, 2 at a time, 1 worker each``."""
        w = self.workers_per_trial
        return f"{self.trials} trials, {self.at_once} at a time, {w} worker{'s' if w > 1 else ''} each"


def plan_concurrency(cfg: PlatformConfig, trials: int, cluster: dict[str, float]) -> ConcurrencyPlan:
    """Trials at once: what the cluster's CPUs (less one for data) and GPUs fit, capped by
    ``tune.max_concurrent_trials`` and by the number of trials.

    Args:
        cluster: ``ray.cluster_resources()`` (``CPU``, ``GPU``).

    Raises:
        ConfigError: one trial needs more CPUs or GPUs than the whole cluster has.
    """
    t, workers = cfg.train, cfg.tune.num_workers_per_trial
    cpus = workers * t.cpus_per_worker + (DRIVER_CPUS if workers > 1 else 0.0)
    gpus = workers if t.use_gpu else 0
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    usable = max(have_cpu - _DATA_CPUS, 0.0) if have_cpu - _DATA_CPUS >= cpus else have_cpu
    if cpus > have_cpu or gpus > have_gpu:
        raise ConfigError(
            f"tune.num_workers_per_trial={workers}: one trial needs {cpus:g} CPUs and {gpus} GPUs but the cluster "
            f"has {have_cpu:g} CPUs and {have_gpu:g} GPUs; lower tune.num_workers_per_trial or train.cpus_per_worker"
        )
    fit = math.floor(usable / cpus + 1e-9)
    if gpus:
        fit = min(fit, math.floor(have_gpu / gpus))
    at_once = max(1, min(fit, trials, cfg.tune.max_concurrent_trials or trials))
    return ConcurrencyPlan(trials, at_once, workers, cpus, gpus)

"""Connecting to Ray: an embedded local cluster on a laptop, the real one under ``ray job submit``.

Without ``RAY_ADDRESS`` every command starts an embedded local cluster; with it set (``ray job submit`` sets
it for the job's driver) the same code joins that cluster instead.
"""

from __future__ import annotations

import logging
import os

__all__ = ["init_ray"]


def init_ray(num_cpus: int | None = None, quiet_data_progress: bool = True) -> None:
    """Start or join a Ray cluster once per process.

    Args:
        num_cpus: logical CPUs of an embedded local cluster (ignored when joining an existing cluster).
        quiet_data_progress: show one progress bar per Ray Data job instead of one per operator.
    """
    import ray

    if ray.is_initialized():
        return
    joining = bool(os.environ.get("RAY_ADDRESS"))
    ray.init(
        # "local": a new embedded cluster even if a `ray start` cluster runs on this machine; RAY_ADDRESS joins one.
        address=None if joining else "local",
        num_cpus=None if joining else num_cpus,
        logging_level=logging.WARNING,
        # The dashboard stays on: Train V2 frees the placement groups of stopped runs (ASHA) through it.
    )
    if quiet_data_progress:
        from ray.data import DataContext

        DataContext.get_current().enable_operator_progress_bars = False

"""Connecting to Ray: an embedded local cluster on a laptop, the real one under ``ray job submit``.

Without ``RAY_ADDRESS`` every command starts an embedded local cluster; with it set (``ray job submit`` sets
it for the job's driver) the same code joins that cluster instead.

The console shows the platform's own lines and warnings; Ray's, Ray Data's and Serve's INFO logs go to the
log files of the Ray session (``<session dir>/logs``, e.g. ``/tmp/ray/session_latest/logs``). A cluster
started with ``ray start`` decides this for its own Serve actors: start it with ``RAY_SERVE_LOG_TO_STDERR=0``
for the same effect.
"""

from __future__ import annotations

import logging
import os
import warnings

__all__ = ["in_submitted_job", "init_ray", "quiet_console"]


def in_submitted_job() -> bool:
    """Whether this process is the driver of a submitted Ray job (``ray job submit``, ``aigc submit``).

    Ray's job supervisor gives the driver its job config in this variable; nothing else sets it.
    """
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


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
    # Serve's actors (controller, proxy, replicas) write their logs to the session's files and, unless this is
    # 0, to stderr, which Ray forwards to this console line by line. Read when they start, so set it before.
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    ray.init(
        # "local": a new embedded cluster even if a `ray start` cluster runs on this machine; RAY_ADDRESS joins one.
        address=None if joining else "local",
        num_cpus=None if joining else num_cpus,
        logging_level=logging.WARNING,
        # The dashboard stays on: Train V2 frees the placement groups of stopped runs (ASHA) through it.
    )
    quiet_console()
    if quiet_data_progress:
        from ray.data import DataContext

        DataContext.get_current().enable_operator_progress_bars = False


def quiet_console() -> None:
    """Keep Ray Data's and Serve's INFO lines off this process's console (their log files keep them)."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger: a session file handler + a console one)
    from ray.data._internal.logging import SessionFileHandler

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler):
            handler.setLevel(logging.WARNING)
            handler.addFilter(_NotAboutOurProgressChoice())
    # Serve's client side logs to the console only ("Started Serve...", "Deployed app..."); its logger is
    # reconfigured when ray.serve is imported, so filter on the logger itself, which that keeps.
    serve_log = logging.getLogger("ray.serve")
    if not any(isinstance(f, _WarningsOnly) for f in serve_log.filters):
        serve_log.addFilter(_WarningsOnly())
    # peft asks every model `is_gradient_checkpointing`, which transformers 5 deprecated: not ours to fix.
    warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class _WarningsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


class _NotAboutOurProgressChoice(logging.Filter):
    """Drops Ray Data's notice that operator progress bars are off: ``init_ray`` turned them off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Progress bars for operators disabled" not in record.getMessage()

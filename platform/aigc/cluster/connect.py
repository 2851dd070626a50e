"""Connecting to Ray: an embedded local cluster on a laptop, the real one under ``ray job submit``.

Without ``RAY_ADDRESS`` every command starts an embedded local cluster; with it set (``ray job submit`` sets
it for the job's driver) the same code joins that cluster instead.

The console shows the platform's own lines: each stage's progress, drawn by this driver (:mod:`aigc.console`).
What Ray's worker processes print (Train workers, Tune trials, Serve replicas, Ray Data's coordinators) and
Ray's own INFO and warning lines stay in the log files of the Ray session (``<session dir>/logs``, e.g.
``/tmp/ray/session_latest/logs``; :func:`link_ray_logs` links them from a run directory). ``verbose``
(``init_ray(verbose=True)`` or ``AIGC_VERBOSE=1``) brings all of it back to the console. A cluster started with
``ray start`` decides this for its own Serve actors: start it with ``RAY_SERVE_LOG_TO_STDERR=0``.
"""

from __future__ import annotations

import logging
import os
import warnings

from aigc import console

__all__ = ["in_submitted_job", "init_ray", "link_ray_logs", "quiet_console", "ray_logs_dir"]

_DRIVER_LOG = "aigc-driver.log"  # Ray's driver-side warnings, in the session's logs directory
_session_logs: str | None = None


def in_submitted_job() -> bool:
    """Whether this process is the driver of a submitted Ray job (``ray job submit``, ``aigc submit``).

    Ray's job supervisor gives the driver its job config in this variable; nothing else sets it.
    """
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def init_ray(num_cpus: int | None = None, quiet_data_progress: bool = True, verbose: bool | None = None) -> None:
    """Start or join a Ray cluster once per process.

    Args:
        num_cpus: logical CPUs of an embedded local cluster (ignored when joining an existing cluster).
        quiet_data_progress: show one progress bar per Ray Data job instead of one per operator.
        verbose: show what Ray's workers print and Ray's own log lines on this console too; None: as
            ``AIGC_VERBOSE`` says (off unless it is ``1``). Off, they stay in the session's log files, and one
            line says where.
    """
    import ray

    if ray.is_initialized():
        return
    verbose = console.verbose() if verbose is None else verbose
    if verbose:
        os.environ[console.VERBOSE_ENV] = "1"  # stages started later in this process ask aigc.console
    joining = bool(os.environ.get("RAY_ADDRESS"))
    if not verbose:
        # Serve's actors (controller, proxy, replicas) write their logs to the session's files and, unless this
        # is 0, to stderr, which Ray forwards to this console line by line. Read when they start: set it before.
        os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
        _console_handlers_at(logging.getLogger("ray"), logging.ERROR)  # before ray.init: it warns while starting
        # Tune's new output engine prints its configuration box and a TensorBoard hint even at verbose=0; the
        # legacy one prints nothing at verbose=0, and the sweep draws its own line (aigc.tune.progress).
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    context = ray.init(
        # "local": a new embedded cluster even if a `ray start` cluster runs on this machine; RAY_ADDRESS joins one.
        address=None if joining else "local",
        num_cpus=None if joining else num_cpus,
        logging_level=logging.WARNING,
        # Workers' stdout/stderr stay in <session>/logs/worker-*.out|err; the driver draws each stage's progress.
        log_to_driver=verbose,
        # The dashboard stays on: Train V2 frees the placement groups of stopped runs (ASHA) through it.
    )
    global _session_logs
    _session_logs = os.path.join(context.address_info["session_dir"], "logs")
    from ray.data import DataContext

    data = DataContext.get_current()
    # Ray Data's own bar on a terminal; in a file or pipe its redrawn bars would only add lines.
    data.enable_progress_bars = verbose or console.interactive()
    if quiet_data_progress:
        data.enable_operator_progress_bars = False
    if verbose:
        return
    quiet_console()
    _log_ray_warnings_to(os.path.join(_session_logs, _DRIVER_LOG))
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")  # Ray's internals, not ours
    print(f"[ray] logs of Ray and its workers: {_session_logs} ({console.VERBOSE_ENV}=1 shows them here)", flush=True)


def ray_logs_dir() -> str | None:
    """The Ray session's log directory that :func:`init_ray` started or joined (None before it ran)."""
    return _session_logs


def link_ray_logs(run_dir: str) -> str | None:
    """Link ``<run_dir>/logs/ray`` to the Ray session's log directory, so a run's directory leads to its
    workers' output. Returns the link, or None (no session yet, or ``run_dir`` is a URI or cannot hold one)."""
    from aigc import storage

    if _session_logs is None or storage.is_uri(run_dir):
        return None
    link = os.path.join(run_dir, "logs", "ray")
    try:
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.islink(link):
            os.unlink(link)
        os.symlink(_session_logs, link, target_is_directory=True)
    except OSError:
        return None
    return link


def _console_handlers_at(logger: logging.Logger, level: int) -> None:
    """Raise the level of ``logger``'s console handlers (its file handlers keep theirs)."""
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(level)


def _log_ray_warnings_to(path: str) -> None:
    """Ray's driver-side warnings (Train, Tune, Serve clients) into ``path``: off the console, still on record."""
    ray_log = logging.getLogger("ray")
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in ray_log.handlers):
        return
    handler = logging.FileHandler(path)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ray_log.addHandler(handler)


def quiet_console() -> None:
    """Keep Ray Data's and Serve's INFO lines off this process's console (their log files keep them)."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger: a session file handler + a console one)
    from ray.data._internal import logging as data_logging

    # Ray Data rebuilds its loggers from DEFAULT_CONFIG whenever a dataset's context reaches this process
    # (DataContext._set_current -> configure_logging), which would bring the INFO console handler back in the
    # middle of a run: quiet the config itself, then apply it now.
    to_console = data_logging.DEFAULT_CONFIG["handlers"]["console"]
    to_console["level"] = "WARNING"
    data_logging.DEFAULT_CONFIG["filters"]["aigc_progress_choice"] = {"()": f"{__name__}._NotAboutOurProgressChoice"}
    if "aigc_progress_choice" not in to_console.setdefault("filters", []):
        to_console["filters"].append("aigc_progress_choice")
    if data_logging.RAY_DATA_LOGGING_CONFIG_ENV_VAR_NAME not in os.environ:  # a user's own config wins
        data_logging.configure_logging()
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
    """Drops Ray Data's notices that its (operator) progress bars are off: ``init_ray`` turned them off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Progress bars for operators disabled", "Progress bars disabled"))

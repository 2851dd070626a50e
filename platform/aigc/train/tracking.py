"""Experiment tracking from rank 0: run params, per-step metrics and artifacts, to MLflow and TensorBoard.

Where things go (``tracking`` config section):

- **MLflow** (``tracking.mlflow``): ``tracking.tracking_uri`` when set (``http://host:5000``, ``databricks``,
  ``sqlite:///...`` with the full ``mlflow`` package), otherwise a file store under ``<output_dir>/mlruns``
  (``mlflow ui --backend-store-uri <output_dir>/mlruns`` shows it). MLflow 3.x keeps the file store in
  maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``; this module sets that variable for
  its own file stores, because the database store (SQLite) needs SQLAlchemy and Alembic, which
  ``mlflow-skinny`` leaves out, and the file store works offline with nothing else installed. The experiment is
  ``tracking.experiment``, else the ``train.adapter_name`` found in ``params``, else the run name.
- **TensorBoard** (``tracking.tensorboard``): event files under ``<output_dir>/tensorboard/<run_name>``,
  written with tensorboardX (installed with Ray; TensorBoard itself is only needed to view them).

``output_dir`` may be a URI (``s3://``, ``gs://``): MLflow's file store and the event writer only take local
paths, so both are written to a local mirror (``<tmp>/aigc-tracking/<hash of output_dir>``, the URI's
``mlruns`` downloaded into it first, so that a resumed run is found) and uploaded to ``<output_dir>/mlruns``
and ``<output_dir>/tensorboard/<run_name>`` by :meth:`Tracker.close`. A process killed before ``close`` leaves
its tracking data in the local mirror only; a remote ``tracking_uri`` avoids that.

MLflow runs are tagged with ``aigc.run_name``; :meth:`Tracker.open` with ``resume=True`` continues the latest
run of the experiment with that tag (a restart after a failure keeps one MLflow run per training run).
Nothing here prints to the console: MLflow's "View run at" links are switched off.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import tempfile
import time
from typing import Any

from aigc import storage
from aigc.config import TrackingConfig
from aigc.errors import ConfigError

__all__ = ["RUN_NAME_TAG", "Tracker", "flatten_params"]

RUN_NAME_TAG = "aigc.run_name"
_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow's limits (mlflow.utils.validation): keys, param values, params and metrics per log_batch call.
_MAX_KEY, _MAX_PARAM_VALUE, _PARAMS_PER_BATCH, _METRICS_PER_BATCH = 250, 6000, 100, 1000


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys (``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": "0.001"}``), values as text,
    each key and value cut to MLflow's limits (250 and 6,000 characters)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name[:_MAX_KEY]] = str(value)[:_MAX_PARAM_VALUE]
    return flat


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The real-number values (ints, floats, numpy scalars, one-element tensors); bools, None and text skipped."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "numel") and value.numel() == 1:  # a torch tensor
            value = value.item()
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            out[key[:_MAX_KEY]] = float(value)
    return out


def _is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri and not uri.startswith(("databricks", "sqlite:"))


def _local_root(output_dir: str) -> str:
    """``output_dir`` itself when local; for a URI, a local mirror with the URI's ``mlruns`` copied in."""
    if not storage.is_uri(output_dir):
        return output_dir
    root = os.path.join(tempfile.gettempdir(), "aigc-tracking", hashlib.sha256(output_dir.encode()).hexdigest()[:16])
    os.makedirs(root, exist_ok=True)
    remote = storage.join(output_dir, "mlruns")
    if storage.is_dir(remote):
        storage.copy_dir(remote, os.path.join(root, "mlruns"))
    return root


class Tracker:
    """One training run's tracking: MLflow run and/or TensorBoard writer, or nothing (:meth:`disabled`).

    Rank 0 opens one with :meth:`open`; the other ranks use :meth:`disabled`, whose methods do nothing, so the
    loop calls the same methods on every rank.

    Attributes:
        run_id: the MLflow run id (a sweep passes it as ``parent_run_id`` to its trials); None without MLflow.
    """

    def __init__(self) -> None:
        self.run_id: str | None = None
        self._client: Any = None
        self._writer: Any = None
        self._output_dir = ""
        self._local = ""
        self._tb_subdir = ""
        self._closed = False

    @classmethod
    def disabled(cls) -> Tracker:
        """A tracker whose every method is a no-op (the other ranks, or tracking switched off)."""
        return cls()

    @classmethod
    def open(
        cls,
        tracking: TrackingConfig,
        output_dir: str,
        run_name: str,
        params: dict[str, Any],
        *,
        parent_run_id: str | None = None,
        resume: bool = False,
    ) -> Tracker:
        """Start (or, with ``resume``, continue) the run ``run_name`` and log ``params`` (flattened).

        Args:
            tracking: the ``tracking`` config section.
            output_dir: the run's output directory (local or URI); files go under ``mlruns/`` and
                ``tensorboard/<run_name>/`` there.
            run_name: the training run's name (Ray Train's run name), kept as the MLflow run name and tag.
            params: nested dicts of settings (e.g. ``{"train": cfg.train.model_dump(), ...}``).
            parent_run_id: an MLflow run to nest this one under (a sweep's trials).
            resume: continue the latest MLflow run tagged with ``run_name`` if there is one (its params are
                kept; only params it lacks are added).

        Raises:
            ConfigError: ``tracking.mlflow`` is on but MLflow is not installed.
        """
        tracker = cls()
        if not (tracking.mlflow or tracking.tensorboard):
            return tracker
        tracker._output_dir, tracker._local = output_dir, _local_root(output_dir)
        if tracking.mlflow:
            flat = flatten_params(params)
            experiment = tracking.experiment or flat.get("train.adapter_name") or run_name
            tracker._open_mlflow(tracking.tracking_uri, experiment, run_name, flat, parent_run_id, resume)
        if tracking.tensorboard:
            from tensorboardX import SummaryWriter

            tracker._tb_subdir = os.path.join("tensorboard", run_name)
            tracker._writer = SummaryWriter(logdir=os.path.join(tracker._local, tracker._tb_subdir))
        return tracker

    def _open_mlflow(
        self, uri: str | None, experiment: str, run_name: str, params: dict[str, str], parent: str | None, resume: bool
    ) -> None:
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "🏃 View run at" lines
        uri = uri or "file:" + os.path.abspath(os.path.join(self._local, "mlruns"))
        if _is_file_store(uri):
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # see the module docstring
        try:
            from mlflow.entities import Param
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ConfigError(
                "tracking.mlflow is true but MLflow is not installed: pip install mlflow-skinny, or set "
                "tracking.mlflow=false"
            ) from exc

        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            try:
                experiment_id = client.create_experiment(experiment)
            except MlflowException:  # a concurrent trial created it first
                experiment_id = client.get_experiment_by_name(experiment).experiment_id

        run = None
        if resume:
            runs = client.search_runs(
                [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", order_by=["start_time DESC"]
            )
            run = runs[0] if runs else None
        if run is not None:
            client.update_run(run.info.run_id, status="RUNNING")
            params = {k: v for k, v in params.items() if k not in run.data.params}  # MLflow refuses changes
        else:
            tags = {RUN_NAME_TAG: run_name, **({"mlflow.parentRunId": parent} if parent else {})}
            run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        self._client, self.run_id = client, run.info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            client.log_batch(self.run_id, params=items[i : i + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Log the numeric values of ``metrics`` at ``step``; other values (None, text, bools) are skipped."""
        values = _numeric(metrics)
        if self._closed or not values:
            return
        if self._client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(k, v, now, step) for k, v in values.items()]
            for i in range(0, len(items), _METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=items[i : i + _METRICS_PER_BATCH])
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(k, v, step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set MLflow tags on the run (values as text, cut to MLflow's limit); nothing without MLflow."""
        if self._closed or self._client is None:
            return
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key[:_MAX_KEY], str(value)[:_MAX_PARAM_VALUE])

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Copy a local file or directory into the MLflow run's artifacts (under ``artifact_path`` if given).

        Raises:
            FileNotFoundError: ``local_path`` does not exist.
        """
        if self._closed or self._client is None:
            return
        if os.path.isdir(local_path):
            self._client.log_artifacts(self.run_id, local_path, artifact_path)
        elif os.path.isfile(local_path):
            self._client.log_artifact(self.run_id, local_path, artifact_path)
        else:
            raise FileNotFoundError(f"artifact {local_path!r} does not exist: pass a local file or directory")

    def close(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (``FINISHED``, ``FAILED`` or ``KILLED``); upload the local mirror when
        ``output_dir`` is a URI. A second call does nothing.

        Raises:
            ValueError: an unknown status.
        """
        if status not in _STATUSES:
            raise ValueError(f"unknown run status {status!r}: use one of {', '.join(_STATUSES)}")
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        if self._client is not None:
            self._client.set_terminated(self.run_id, status=status)
        if storage.is_uri(self._output_dir):
            for sub in ("mlruns", self._tb_subdir):
                if sub and os.path.isdir(os.path.join(self._local, sub)):
                    storage.copy_dir(os.path.join(self._local, sub), storage.join(self._output_dir, sub))

"""One publish step for training and sweeps: checkpoint -> exported model directory -> registry entry.

A checkpoint written by :mod:`aigc.train.checkpointing` holds the trained weights under ``adapter/`` (a PEFT adapter for
LoRA, a whole ``save_pretrained`` model for a full fine-tune) and the metric history up to that checkpoint.
Publishing exports those weights with the tokenizer to ``dest`` (local or a URI) and registers them. The export
replaces ``dest`` whole (:func:`aigc.storage.replace_dir`): a publish killed part-way leaves the previous export
in place locally, and on an object store a tree that :func:`aigc.storage.is_complete` does not count.

One rule for the metrics recorded, whoever publishes: the exported checkpoint's own epoch, i.e. the last
entry of its history, so a registry entry's metrics always describe the weights stored with it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from aigc import storage
from aigc.config import PlatformConfig
from aigc.errors import StorageError
from aigc.train.checkpointing import ADAPTER_SUBDIR, HISTORY_FILE, STEPS_FILE

__all__ = ["Published", "checkpoint_metrics", "publish", "read_progress", "register_model"]


@dataclass
class Published:
    """Where the weights went and what was recorded about them."""

    model_dir: str
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    registry_id: str | None
    step_losses: list[float] = field(default_factory=list)


def checkpoint_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    """The numeric metrics of a checkpoint's own epoch (the last entry of its history)."""
    return {k: v for k, v in history[-1].items() if isinstance(v, int | float)} if history else {}


def _read_progress_dir(local: str) -> tuple[list[dict[str, Any]], list[float]]:
    with open(os.path.join(local, HISTORY_FILE)) as f:
        history = json.load(f)
    step_losses: list[float] = []
    steps_file = os.path.join(local, STEPS_FILE)
    if os.path.isfile(steps_file):  # checkpoints from before per-step losses were kept have none
        with open(steps_file) as f:
            step_losses = json.load(f)
    return history, step_losses


def read_progress(checkpoint: Any) -> tuple[list[dict[str, Any]], list[float]]:
    """A checkpoint's report history and per-step train losses."""
    with checkpoint.as_directory() as local:
        return _read_progress_dir(local)


def register_model(
    cfg: PlatformConfig,
    model_dir: str,
    metrics: dict[str, Any],
    config: dict[str, Any],
    data_hash: str | None,
) -> Any:
    """Register ``model_dir`` as the next version of ``train.adapter_name`` in ``registry_dir``: the one rule for
    what an entry records (its base model and pinned commit, metrics, config, data fingerprint), whoever
    registers (:func:`publish`, the pipeline's register stage).

    Returns:
        The new registry entry (or the existing one holding the same weights).

    Raises:
        StorageError: ``model_dir`` is not a whole published tree (a publish to an object store killed part-way).
    """
    from aigc.registry import Registry

    if not storage.is_complete(model_dir):
        why = (f"no {storage.completion_marker(model_dir)}: its publish was interrupted" if storage.is_uri(model_dir)
               else "no such directory")  # fmt: skip
        raise StorageError(f"{model_dir} is not a complete export ({why}); re-run training to export it again")
    return Registry(cfg.registry_dir).register(
        cfg.train.adapter_name,
        model_dir,
        base_model=cfg.model.name_or_path,
        base_model_commit=cfg.model.commit,
        metrics=metrics,
        config=config,
        data_hash=data_hash,
    )


def publish(
    cfg: PlatformConfig,
    checkpoint: Any,
    dest: str,
    *,
    register: bool = True,
    extra_config: dict[str, Any] | None = None,
    data_hash: str | None = None,
    tokenizer: Any = None,
) -> Published:
    """Export ``checkpoint`` (a ``ray.train.Checkpoint``) to ``dest`` and register it as ``train.adapter_name``.

    Args:
        cfg: the run's config (``cfg`` of the trial for a sweep); recorded with the entry.
        checkpoint: the checkpoint to publish; local or on shared storage.
        dest: the export directory, replaced whole if it exists (local path or URI).
        register: also add it to ``cfg.registry_dir`` as the next version.
        extra_config: more keys to record with the config (e.g. the sweep's chosen values).
        data_hash: fingerprint of the training data (from ``stats.json``).
        tokenizer: saved with the weights; loaded from the model's resolved snapshot when not given.
    """
    from aigc.models.loading import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="aigc-publish-") as tmp:
        local = checkpoint.to_directory(os.path.join(tmp, "checkpoint"))
        weights = os.path.join(local, ADAPTER_SUBDIR)
        history, step_losses = _read_progress_dir(local)
        tok = tokenizer or load_tokenizer(cfg.model.load_path(), cfg.model.trust_remote_code)
        tok.save_pretrained(weights)
        storage.replace_dir(weights, dest)
        metrics = checkpoint_metrics(history)
        registry_id = None
        if register:
            config = {**cfg.model_dump(), **(extra_config or {})}
            registry_id = register_model(cfg, weights, metrics, config, data_hash).model_id
    return Published(dest, metrics, history, registry_id, step_losses)

"""The feedback round of ``aigc pipeline``: what it trains on (``pipeline.feedback``, ``pipeline.feedback_method``)
and, for DPO, which served version it starts from (the ``start`` stage).

- ``sft``: the ``aigc feedback export`` rows are mixed into ``data.path`` as one more source; training starts
  from a fresh adapter, as any run does.
- ``dpo``: the round trains on the ``aigc feedback export --pairs`` file alone (``data.preference``,
  ``train.preference.method=dpo``), starting from the version the alias serves when the round starts; that
  version is also the DPO reference (:mod:`aigc.train.init_adapter`). The ``start`` stage pins it once per
  feedback file (its fingerprint is the data's content): a re-run after a kill, or after the round's own promote,
  continues the same round instead of starting another one on top of its result.
"""

from __future__ import annotations

from typing import Any

from aigc.config import PlatformConfig, with_values
from aigc.errors import ConfigError
from aigc.pipeline.runner import Outputs, Stage

__all__ = ["pipeline_config", "round_config", "served_name", "start_stage", "trained_config"]


def pipeline_config(cfg: PlatformConfig) -> PlatformConfig:
    """``cfg`` with the feedback round's data: ``sft`` mixes ``pipeline.feedback`` into ``data.path`` (format
    ``messages``, weight ``pipeline.feedback_weight``); ``dpo`` trains on it alone as preference pairs. ``cfg``
    itself when there is no feedback file."""
    p = cfg.pipeline
    if not p.feedback:
        return cfg
    feedback = {"path": p.feedback, "format": "messages", "columns": {}}
    if p.feedback_method == "dpo":
        return with_values(cfg, {"data.path": [feedback], "data.preference": True, "data.packing": False,
                                 "train.preference.method": "dpo"})  # fmt: skip
    items = cfg.data.path if isinstance(cfg.data.path, list) else [cfg.data.path]
    sources = [s if isinstance(s, str) else s.model_dump(exclude_none=True) for s in items]
    return with_values(cfg, {"data.path": [*sources, {**feedback, "weight": p.feedback_weight}]})


def trained_config(cfg: PlatformConfig, sweep: dict[str, Any] | None) -> PlatformConfig:
    """What the train stage trains: ``cfg`` with the sweep's best values, for the full schedule (``train.epochs``
    and ``train.num_workers`` of ``cfg``, unless the space searched them)."""
    return with_values(cfg, sweep["values"]) if sweep else cfg


def round_config(cfg: PlatformConfig, done: Outputs) -> PlatformConfig:
    """``cfg`` as the round trains it: starting from the version the ``start`` stage pinned (DPO), with the
    sweep's best values (when it swept)."""
    start = done.get("start")
    if start:
        cfg = with_values(cfg, {"train.init_adapter": start["init_adapter"]})
    return trained_config(cfg, done.get("sweep"))


def served_name(cfg: PlatformConfig) -> str:
    """The name the pipeline promotes: ``adapter_name:ALIAS``, or the bare name."""
    name, alias = cfg.train.adapter_name, cfg.pipeline.alias
    return f"{name}:{alias}" if alias else name


def start_stage(cfg: PlatformConfig) -> Stage:
    """``start`` (DPO rounds): pin the version the alias serves now as the round's starting adapter."""
    served = served_name(cfg)

    def inputs(done: Outputs) -> dict[str, Any]:
        return {"served": served, "registry_dir": cfg.registry_dir, "data": done["preprocess"]["data_hash"]}

    def run(_: Outputs) -> dict[str, Any]:
        from aigc.registry import Registry, RegistryError

        try:
            entry = Registry(cfg.registry_dir).resolve(served)
        except (RegistryError, KeyError) as exc:
            raise ConfigError(
                f"pipeline.feedback_method=dpo continues the version {served} serves, but there is none ({exc}); "
                "run the pipeline once without pipeline.feedback (or with feedback_method=sft) first"
            ) from None
        print(f"[start] the DPO round starts from {entry.model_id} (what {served} serves now), also its reference")
        return {"init_adapter": entry.model_id}

    def exists(out: dict[str, Any]) -> bool:
        from aigc.registry import Registry, RegistryError

        try:
            Registry(cfg.registry_dir).resolve(out["init_adapter"])
            return True
        except (RegistryError, KeyError):
            return False

    return Stage("start", inputs, run, upstream="preprocess", exists=exists)

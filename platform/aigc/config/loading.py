"""Typed configuration: one YAML file describes a run, for every stage.

The sections are defined in :mod:`aigc.config.schema` (and importable from here). Load a run's config with
:func:`load_config`, which also applies ``section.key=value`` overrides from the command line.
Every model forbids unknown keys, so a typo (``train.learning_rate``) fails at once, naming the key, before
any cluster work starts.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from aigc.config.schema import (
    AutoscalingConfig,
    ClusterConfig,
    DataConfig,
    GenerateConfig,
    JudgeConfig,
    LoraConfig,
    ModelConfig,
    ModerationConfig,
    PipelineConfig,
    PlatformConfig,
    ServeConfig,
    SourceConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
)
from aigc.errors import ConfigError

__all__ = [
    "AutoscalingConfig",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "GenerateConfig",
    "JudgeConfig",
    "LoraConfig",
    "ModelConfig",
    "ModerationConfig",
    "PipelineConfig",
    "PlatformConfig",
    "ServeConfig",
    "SourceConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "apply_overrides",
    "load_config",
    "resolve_paths",
    "validate_config",
    "with_values",
]


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `aigc config` prints every key)"
        lines.append(f"  {where}: {msg} (got {e.get('input')!r})" if e["type"] != "missing" else f"  {where}: {msg}")
    return "\n".join(lines)


def _is_text_field(keys: list[str]) -> bool:
    """Whether ``keys`` (a dotted override path) lands on a ``str`` field (or a ``dict[str, str]`` entry).

    Such values are taken exactly as typed: ``data.system_prompt=Order #123`` stays ``"Order #123"`` (YAML would
    cut it at the comment), ``2024-01-01`` stays text (YAML would make it a date).
    """
    model: Any = PlatformConfig
    for i, key in enumerate(keys):
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return False
        ann = field.annotation
        # The members of a union (`str | None`); any other type is itself (`list[str]` is a list, not text).
        args = [a for a in get_args(ann) if a is not type(None)] if get_origin(ann) in (Union, UnionType) else [ann]
        if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            model = args[0]
            continue
        if i == len(keys) - 1:
            return args == [str]
        # one level into a mapping field: data.columns.question=instruction
        return i == len(keys) - 2 and get_origin(args[0]) is dict and get_args(args[0])[1:] == (str,)
    return False


def _parse_value(keys: list[str], value: str) -> Any:
    if _is_text_field(keys):
        # Optional text fields still accept an explicit null.
        return None if value in ("null", "~") else value
    return yaml.safe_load(value) if value != "" else ""


def _set_path(raw: dict[str, Any], keys: list[str], value: Any, what: str) -> None:
    node = raw
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{what}: {k!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config dict.

    Values for text fields are kept exactly as typed; every other value is parsed as a YAML scalar or flow
    collection (``3e-4``, ``true``, ``[q_proj, v_proj]``).
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, value = item.split("=", 1)
        keys = dotted.strip().split(".")
        if not all(keys):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            parsed = _parse_value(keys, value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        _set_path(raw, keys, parsed, f"override {item!r}")
    return raw


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    inline: dict[str, Any] | None = None,
) -> PlatformConfig:
    """Load a YAML config file (or the defaults), merge ``inline`` sections into it, then apply overrides.

    ``inline`` is a nested mapping (e.g. Serve's YAML ``args``: ``{"serve": {"port": 9000}}``) merged as
    objects, never through text; ``overrides`` (``section.key=value``) win over both.

    Raises:
        ConfigError: the file is missing or not a mapping, or a field is invalid; the message names it.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded or {}
    if inline:
        raw = _deep_merge(raw, inline)
        source += " + inline sections"
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " + overrides"
    return resolve_paths(validate_config(raw, source))


def _absolute(path: str) -> str:
    return path if "://" in path or os.path.isabs(path) else os.path.abspath(path)


def resolve_paths(cfg: PlatformConfig) -> PlatformConfig:
    """Relative local paths made absolute, once, where the run's config is loaded.

    Train workers, Tune trials, Ray Data actors and Serve replicas do not run in the driver's working
    directory (nor on its node), so they only ever see absolute paths or URIs. ``model.name_or_path`` is a
    path only when it exists here; otherwise it is a hub id and stays as it is.
    """
    out = cfg.model_copy(deep=True)
    out.output_dir, out.registry_dir = _absolute(cfg.output_dir), _absolute(cfg.registry_dir)
    out.tune.space = _absolute(cfg.tune.space)

    def absolute_source(p: str | SourceConfig) -> str | SourceConfig:
        return _absolute(p) if isinstance(p, str) else p.model_copy(update={"path": _absolute(p.path)})

    path = cfg.data.path
    out.data.path = [absolute_source(p) for p in path] if isinstance(path, list) else absolute_source(path)
    if cfg.serve.api_keys_file:
        out.serve.api_keys_file = _absolute(cfg.serve.api_keys_file)
    if cfg.serve.feedback_dir:
        out.serve.feedback_dir = _absolute(cfg.serve.feedback_dir)
    if cfg.pipeline.feedback:
        out.pipeline.feedback = _absolute(cfg.pipeline.feedback)
    for key in ("input", "output", "eval_dir", "eval_pairs"):
        if getattr(cfg.generate, key):
            setattr(out.generate, key, _absolute(getattr(cfg.generate, key)))
    if os.path.exists(cfg.model.name_or_path):
        out.model.name_or_path = _absolute(cfg.model.name_or_path)
    if cfg.model.cache_dir:
        out.model.cache_dir = _absolute(os.path.expanduser(cfg.model.cache_dir))
    return out


def with_values(base: PlatformConfig, values: dict[str, Any]) -> PlatformConfig:
    """``base`` with ``{"section.key": value}`` set by key path (what a sweep trial runs with), validated.

    Values are set as the objects they are (a float stays a float, a string is never re-parsed).

    Raises:
        ConfigError: a key names no field, or a value the field rejects; the message names the key.
    """
    raw = base.model_dump()
    for dotted, value in values.items():
        _set_path(raw, dotted.split("."), copy.deepcopy(value), f"key {dotted!r}")
    return validate_config(raw, f"values {values}")


def validate_config(raw: dict[str, Any], source: str = "config") -> PlatformConfig:
    """Validate a raw config dict; ``source`` names where it came from in the error message.

    Raises:
        ConfigError: one line per invalid field, each naming the field and the reason.
    """
    try:
        return PlatformConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None

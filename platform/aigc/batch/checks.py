"""What ``aigc generate`` and ``aigc eval`` check before any Ray work: the input, the models, the pairs, the judge.

Each failure is a :class:`~aigc.errors.ConfigError` naming the ``generate.*`` key to change.
"""

from __future__ import annotations

import os

from aigc.batch.inputs import detect_format, read_rows
from aigc.batch.models import resolve_model_ref
from aigc.config import PlatformConfig
from aigc.errors import ConfigError

__all__ = ["check", "check_eval"]


def check(cfg: PlatformConfig) -> PlatformConfig:
    """``aigc generate``'s checks: ``generate.input`` is set and readable with a known format, ``generate.model``
    resolves to a servable version."""
    g = cfg.generate
    if not g.input:
        raise ConfigError("generate.input is not set: give a dataset file, directory or glob of prompts")
    raws = read_rows(g.input, min(g.limit or 20, 20))
    if not raws:
        raise ConfigError(f"generate.input={g.input!r} holds no records")
    detect_format(raws, g.format, g.prompt_column)
    resolve_model_ref(cfg, g.model)
    return cfg


def check_eval(cfg: PlatformConfig) -> PlatformConfig:
    """``aigc eval``'s checks: those of ``aigc generate`` for every model of ``generate.eval_models``, the pairs
    file, and the judge's key."""
    g = cfg.generate
    check(cfg.model_copy(update={"generate": g.model_copy(update={"model": g.eval_models[0]})}))
    for ref in g.eval_models[1:]:
        resolve_model_ref(cfg, ref, key="generate.eval_models")
    if g.eval_pairs:
        pairs = read_rows(g.eval_pairs, 20, what="generate.eval_pairs")
        if not pairs:
            raise ConfigError(f"generate.eval_pairs={g.eval_pairs!r} holds no records")
        detect_format(pairs, g.eval_pairs_format, g.prompt_column, pairs=True)
    if g.judge is not None and g.judge.api_key_env and not os.environ.get(g.judge.api_key_env):
        raise ConfigError(f"generate.judge.api_key_env: the environment variable {g.judge.api_key_env} is not set")
    return cfg

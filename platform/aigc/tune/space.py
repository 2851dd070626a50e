"""Declarative search spaces: YAML files in ``tune_spaces/`` over any config key.

```yaml
train.lr: {loguniform: [3.0e-4, 3.0e-3]}   # log-uniform between the bounds
lora.r: {choice: [4, 8, 16]}                # one of the values
lora.dropout: {uniform: [0.0, 0.1]}
train.batch_size: {grid: [8, 16]}           # every value, crossed with the samples
```

Keys are checked against the platform config before any cluster work: a misspelt key or a value the
config would reject fails here, naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from aigc.config import ConfigError, PlatformConfig, with_values

__all__ = ["DISTRIBUTIONS", "load_space", "to_param_space", "candidate_values"]

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


def load_space(path: str | Path, base: PlatformConfig) -> dict[str, dict[str, list[Any]]]:
    """Read and validate a space file; returns ``{config key: {distribution: args}}``.

    Raises:
        ConfigError: missing file, unknown distribution, bad bounds, or a key/value the config rejects.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"tune.space: search-space file not found: {p}")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"tune.space {p}: expected a mapping of config keys to distributions")
    space: dict[str, dict[str, list[Any]]] = {}
    for key, spec in raw.items():
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"tune.space {p}: {key}: expected one of {{{', '.join(DISTRIBUTIONS)}: [...]}}")
        ((dist, args),) = spec.items()
        if dist not in DISTRIBUTIONS:
            raise ConfigError(f"tune.space {p}: {key}: unknown distribution {dist!r}; use one of {DISTRIBUTIONS}")
        if not isinstance(args, list) or not args:
            raise ConfigError(f"tune.space {p}: {key}.{dist}: expected a non-empty list")
        if dist in ("uniform", "loguniform", "randint"):
            if len(args) != 2 or not all(isinstance(a, int | float) for a in args) or not args[0] < args[1]:
                raise ConfigError(f"tune.space {p}: {key}.{dist}: expected [low, high] with low < high, got {args}")
            if dist == "loguniform" and args[0] <= 0:
                raise ConfigError(f"tune.space {p}: {key}.loguniform: bounds must be > 0, got {args}")
        space[key] = {dist: args}
    for values in candidate_values(space):
        _check(base, values, p)
    return space


def candidate_values(space: dict[str, dict[str, list[Any]]]) -> list[dict[str, Any]]:
    """Extreme values of every key (bounds, each choice) used to validate the space up front."""
    out = []
    for key, spec in space.items():
        ((dist, args),) = spec.items()
        vals = args if dist in ("choice", "grid") else [args[0], args[1] - (1 if dist == "randint" else 0)]
        out.extend({key: v} for v in vals)
    return out


def _check(base: PlatformConfig, values: dict[str, Any], path: Path) -> None:
    try:
        with_values(base, values)
    except ConfigError as exc:
        raise ConfigError(f"tune.space {path}: {exc}") from None


def to_param_space(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """Ray Tune sampling objects, keyed by the config key."""
    from ray import tune

    make = {
        "choice": lambda a: tune.choice(a),
        "grid": lambda a: tune.grid_search(a),
        "uniform": lambda a: tune.uniform(a[0], a[1]),
        "loguniform": lambda a: tune.loguniform(a[0], a[1]),
        "randint": lambda a: tune.randint(a[0], a[1]),
    }
    return {key: make[dist](args) for key, spec in space.items() for dist, args in spec.items()}

"""Declarative search spaces: YAML files in ``tune_spaces/`` over any config key.

```yaml
train.lr: {loguniform: [3.0e-4, 3.0e-3]}       # log-uniform between the bounds
lora.r: {choice: [4, 8, 16]}                    # one of the values, drawn per trial
lora.dropout: {uniform: [0.0, 0.1]}             # uniform between the bounds
train.warmup_steps: {quniform: [0, 20, 5]}      # uniform, rounded to a multiple of 5
train.seed: {randint: [0, 100]}                 # an integer in [low, high)
train.batch_size: {grid: [8, 16]}               # every value, crossed with the other keys
lora.alpha: {multiple_of: [lora.r, {choice: [1, 2, 4]}]}   # conditional: alpha = r x a sampled factor
```

A conditional key (``multiple_of``) is sampled as a hidden factor, ``"lora.alpha = lora.r x"``, which every
search algorithm (Optuna too) sees as an ordinary parameter; :func:`resolve` turns a trial's sampled values
into config values (``lora.alpha = lora.r * factor``).

Every entry is checked before any cluster work: an unknown key, an unknown distribution, impossible bounds,
a ``multiple_of`` naming a key that is not in the space, or a value the config would reject fails here with a
:class:`~aigc.errors.ConfigError` naming the entry.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aigc.config import PlatformConfig, with_values
from aigc.errors import ConfigError

__all__ = ["DISTRIBUTIONS", "Param", "Space", "load_space", "resolve", "to_param_space"]

DISTRIBUTIONS = ("choice", "grid", "uniform", "quniform", "loguniform", "randint", "multiple_of")
_ENUMERATED = ("choice", "grid")
_FACTOR_SEP = " = "  # hidden factor key: "lora.alpha = lora.r x"


@dataclass(frozen=True)
class Param:
    """One searched key: ``dist`` over ``args``; with ``of`` set, the value is ``config[of] * sampled factor``."""

    key: str
    dist: str
    args: tuple[Any, ...]
    of: str | None = None

    @property
    def sampled_key(self) -> str:
        """The key the search algorithm samples (the hidden factor for a conditional key)."""
        return f"{self.key}{_FACTOR_SEP}{self.of} x" if self.of else self.key

    def extremes(self) -> list[Any]:
        """Values that bound the distribution: each value of a choice/grid, else the lowest and highest."""
        if self.dist in _ENUMERATED:
            return list(self.args)
        if self.dist == "randint":
            return [self.args[0], self.args[1] - 1]
        if self.dist == "quniform":
            lo, hi, q = self.args
            return [math.ceil(lo / q) * q, math.floor(hi / q) * q]
        return [self.args[0], self.args[1]]


@dataclass(frozen=True)
class Space:
    """A validated search space (keys in file order) and the file it came from."""

    params: tuple[Param, ...]
    source: str

    @property
    def keys(self) -> list[str]:
        """The config keys set by a trial (conditional keys included)."""
        return [p.key for p in self.params]

    def grid_size(self) -> int:
        """Combinations of the ``grid`` keys (1 when there are none)."""
        return math.prod(len(p.args) for p in self.params if p.dist == "grid")

    def enumerable_size(self) -> int | None:
        """Combinations when every key is a choice or grid (what ``tune.search=grid`` runs), else None."""
        if any(p.dist not in _ENUMERATED for p in self.params):
            return None
        return math.prod(len(p.args) for p in self.params)


def _bad(source: str, entry: str, why: str) -> ConfigError:
    return ConfigError(f"tune.space {source}: {entry}: {why}")


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _parse_dist(source: str, key: str, spec: Any) -> tuple[str, tuple[Any, ...]]:
    """``{dist: args}`` -> (dist, args), with bounds checked."""
    shapes = "{choice|grid: [values]}, {uniform|loguniform|randint: [low, high]}, {quniform: [low, high, q]}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _bad(source, key, f"expected one distribution, e.g. {shapes}; got {spec!r}")
    ((dist, args),) = spec.items()
    if dist not in DISTRIBUTIONS or dist == "multiple_of":
        raise _bad(source, key, f"unknown distribution {dist!r}; use one of {DISTRIBUTIONS}")
    if not isinstance(args, list) or not args:
        raise _bad(source, f"{key}.{dist}", f"expected a non-empty list, got {args!r}")
    if dist in _ENUMERATED:
        return dist, tuple(args)
    want = 3 if dist == "quniform" else 2
    if len(args) != want or not all(_number(a) for a in args):
        form = "[low, high, q]" if dist == "quniform" else "[low, high]"
        raise _bad(source, f"{key}.{dist}", f"expected {form} numbers, got {args}")
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise _bad(source, f"{key}.{dist}", f"impossible bounds {args}: low must be < high")
    if dist == "loguniform" and lo <= 0:
        raise _bad(source, f"{key}.loguniform", f"bounds must be > 0 (a log scale), got {args}")
    if dist == "randint" and not all(isinstance(a, int) for a in args):
        raise _bad(source, f"{key}.randint", f"bounds must be integers, got {args}")
    if dist == "quniform":
        q = args[2]
        if q <= 0 or math.floor(hi / q) * q < math.ceil(lo / q) * q:
            raise _bad(source, f"{key}.quniform", f"no multiple of q={q} lies in [{lo}, {hi}]")
    return dist, tuple(args)


def _parse(source: str, key: Any, spec: Any) -> Param:
    if not isinstance(key, str) or "." not in key:
        raise _bad(source, str(key), "expected a dotted config key such as train.lr")
    if isinstance(spec, dict) and list(spec) == ["multiple_of"]:
        args = spec["multiple_of"]
        if not (isinstance(args, list) and len(args) == 2 and isinstance(args[0], str)):
            raise _bad(source, f"{key}.multiple_of", f"expected [other.key, {{distribution: [...]}}], got {args!r}")
        dist, inner = _parse_dist(source, f"{key}.multiple_of", args[1])
        return Param(key, dist, inner, of=args[0])
    dist, args = _parse_dist(source, key, spec)
    return Param(key, dist, args)


def load_space(path: str | Path, base: PlatformConfig) -> Space:
    """Read and validate a space file.

    Raises:
        ConfigError: a missing file, or an entry that is wrong (the message names it).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"tune.space: search-space file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"tune.space {p}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"tune.space {p}: expected a mapping of config keys to distributions")
    source = str(p)
    space = Space(tuple(_parse(source, k, v) for k, v in raw.items()), source)
    by_key = {q.key: q for q in space.params}
    for q in space.params:
        if q.of is None:
            continue
        if q.of not in by_key:
            raise _bad(source, f"{q.key}.multiple_of", f"{q.of!r} is not a key of this space; add it or use a number")
        if by_key[q.of].of is not None:
            raise _bad(source, f"{q.key}.multiple_of", f"{q.of!r} is itself conditional; name a plain key")
        if by_key[q.of].dist == "grid" or q.dist == "grid":
            raise _bad(source, f"{q.key}.multiple_of", "use choice, not grid, with a conditional key")
        if not all(_number(v) for v in by_key[q.of].extremes() + q.extremes()):
            raise _bad(source, f"{q.key}.multiple_of", "both the key and the factor must be numbers")
    _check_values(space, base)
    return space


def _check_values(space: Space, base: PlatformConfig) -> None:
    """Set every extreme value of every key on the config, so a value the config rejects fails now."""
    by_key = {p.key: p for p in space.params}
    for p in space.params:
        if p.of is None:
            values = [{p.key: v} for v in p.extremes()]
        else:
            pairs = itertools.product(by_key[p.of].extremes(), p.extremes())
            values = [{p.of: a, p.key: a * f} for a, f in pairs]
        for v in values:
            try:
                with_values(base, v)
            except ConfigError as exc:
                raise ConfigError(f"tune.space {space.source}: {p.key}: {exc}") from None


def resolve(space: Space, sampled: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled values (Tune's ``config``) -> ``{config key: value}``, conditional keys computed.

    Keys the space does not know (e.g. ones a scheduler adds) are ignored.
    """
    out = {p.key: sampled[p.key] for p in space.params if p.of is None and p.key in sampled}
    for p in space.params:
        if p.of is not None and p.sampled_key in sampled:
            out[p.key] = out[p.of] * sampled[p.sampled_key]
    return out


def to_param_space(space: Space, grid_as_choice: bool = False) -> dict[str, Any]:
    """Ray Tune sampling objects keyed by :attr:`Param.sampled_key`.

    Args:
        grid_as_choice: enumerate ``choice`` keys like ``grid`` ones (``tune.search=grid``).
    """
    from ray import tune

    def make(p: Param) -> Any:
        a = p.args
        if p.dist == "grid" or (grid_as_choice and p.dist == "choice"):
            return tune.grid_search(list(a))
        return {
            "choice": lambda: tune.choice(list(a)),
            "uniform": lambda: tune.uniform(a[0], a[1]),
            "quniform": lambda: tune.quniform(a[0], a[1], a[2]),
            "loguniform": lambda: tune.loguniform(a[0], a[1]),
            "randint": lambda: tune.randint(a[0], a[1]),
        }[p.dist]()

    return {p.sampled_key: make(p) for p in space.params}

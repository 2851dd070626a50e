"""Registry aliases: a movable name for one version (``support-bot`` -> v3, ``support-bot:stable`` -> v2).

Layout under the registry root, beside the versions (:mod:`aigc.registry.store`)::

    <name>/aliases/<alias>/<N>.json   move number N: {"version": 3, "history": [{"version": 2, "at": ...}], ...}
    <name>/aliases/_default/...        the bare name's alias: what ``model: <name>`` serves (unset = latest)

An alias may split its traffic between versions (``"weights": {"3": 90, "4": 10}``, ``aigc traffic``): then
``version`` is the one with the largest weight (the newest on a tie), which is what readers that do not pick per
request (``aigc export``, the CLI, a reader of an older release) take; the serving resolver picks per request.
A history entry keeps the weights it had, so a rollback restores a split as it was.

An alias is its newest record. A move (promote or rollback) reads the newest record N and creates record N+1
with create-if-absent (:func:`aigc.storage.create_exclusive`: a hard link locally, a conditional PUT on S3, a
generation match on GCS): a compare-and-swap. When two moves race, one creates N+1 and the other finds it
taken, reads the winner's record and applies its own move on top of it, so no move is lost and ``history``
(the previous targets, newest last) is always one consistent sequence; a rollback moves back without naming a
version. Records older than the newest ``_KEPT_RECORDS`` are deleted. An alias written by an older release as
one file (``<alias>.json``) is read as record 0 and continued.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aigc import storage
from aigc.errors import RegistryError, StorageError

__all__ = ["DEFAULT_ALIAS", "LATEST", "Alias", "AliasStore", "check_alias", "primary_version", "shown_alias"]

DEFAULT_ALIAS = "_default"  # the bare name's alias; cannot clash with a user alias (those start with a letter)
LATEST = "latest"  # reserved: always the newest version, never stored
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
_VERSION_LIKE = re.compile(r"^v[0-9]+$")
_MAX_HISTORY = 50  # previous targets kept per alias (a rollback goes back one at a time)
_RECORD = re.compile(r"^([0-9]{8})\.json$")
_KEPT_RECORDS = 20  # records kept per alias; older ones only cost listing time
_MAX_RACE_TRIES = 100  # moves that lost the compare-and-swap and were applied again on the winner's record


def check_alias(alias: str) -> str:
    """Raise unless ``alias`` can name an alias (``stable``, ``canary-2``); returns it.

    Raises:
        RegistryError: the alias is malformed, looks like a version (``v3``) or is the reserved ``latest``.
    """
    if alias == DEFAULT_ALIAS:
        return alias
    shown = repr(alias[:64]) if isinstance(alias, str) else repr(type(alias).__name__)
    if not isinstance(alias, str) or not _ALIAS.match(alias):
        raise RegistryError(
            f"invalid alias {shown}: use up to 64 letters, digits, '.', '_' or '-', starting with a letter"
        )
    if _VERSION_LIKE.match(alias) or alias == LATEST:
        raise RegistryError(f"alias {shown} is reserved: 'vN' names a version and 'latest' the newest one")
    return alias


def shown_alias(name: str, alias: str) -> str:
    """How users write an alias: the bare name for the default one, else ``name:alias``."""
    return name if alias == DEFAULT_ALIAS else f"{name}:{alias}"


@dataclass
class Alias:
    """One alias: the version it points at now and the ones it pointed at before (oldest first)."""

    name: str
    alias: str
    version: int
    history: list[dict[str, Any]] = field(default_factory=list)
    updated_at: float = 0.0
    weights: dict[int, int] | None = None  # version -> share of the traffic; None = all to ``version``

    @property
    def split(self) -> list[tuple[int, int]]:
        """(version, weight) pairs, ascending versions: ``[(version, 1)]`` without a split."""
        return sorted(self.weights.items()) if self.weights else [(self.version, 1)]

    @property
    def shown_target(self) -> str:
        """``name:v3``, or the split as ``v3=90 v4=10``."""
        return " ".join(f"v{v}={w}" for v, w in self.split) if self.weights else self.target

    @property
    def model_id(self) -> str:
        """The id clients pass as ``model`` to reach this alias (``support-bot`` or ``support-bot:stable``)."""
        return shown_alias(self.name, self.alias)

    @property
    def target(self) -> str:
        """The exact version it points at, ``name:vN``."""
        return f"{self.name}:v{self.version}"

    def to_json(self) -> str:
        data: dict[str, Any] = {"version": self.version, "history": self.history, "updated_at": self.updated_at}
        if self.weights:
            data["weights"] = {str(v): w for v, w in sorted(self.weights.items())}
        return json.dumps(data, indent=2)

    def _as_history(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"version": self.version, "at": self.updated_at}
        if self.weights:
            entry["weights"] = {str(v): w for v, w in sorted(self.weights.items())}
        return entry


def primary_version(weights: dict[int, int]) -> int:
    """The version a split sends most traffic to (the newest on a tie)."""
    return max(weights, key=lambda v: (weights[v], v))


def _weights(raw: Any) -> dict[int, int] | None:
    return {int(v): int(w) for v, w in raw.items()} if raw else None


class AliasStore:
    """Aliases of every name under one registry root. Names are validated by the caller (the registry)."""

    def __init__(self, root: str):
        self.root = root

    def _records(self, name: str, alias: str) -> str:
        return storage.join(self.root, name, "aliases", check_alias(alias))

    def _newest(self, name: str, alias: str, listed: list[str] | None = None) -> tuple[int, Alias | None]:
        """(number of the newest record, the alias it holds); (0, None) when never set.

        Args:
            listed: the base names of the alias's record files when the caller listed them already (None: list).
        """
        folder = self._records(name, alias)
        if listed is None:
            listed = [f.rsplit("/", 1)[-1] for f in storage.list_files(folder, recursive=False)]
        numbers = [int(m.group(1)) for f in listed if (m := _RECORD.match(f))]
        if numbers:
            n = max(numbers)
            return n, self._read(storage.join(folder, f"{n:08d}.json"), name, alias)
        legacy = storage.join(self.root, name, "aliases", f"{alias}.json")  # one file per alias, before records
        return 0, self._read(legacy, name, alias)

    def _read(self, path: str, name: str, alias: str) -> Alias | None:
        try:
            text = storage.read_text(path)
        except (FileNotFoundError, StorageError, OSError):
            if not storage.exists(path):
                return None
            raise RegistryError(f"alias {shown_alias(name, alias)} cannot be read; promote it again") from None
        try:
            data = json.loads(text)
            return Alias(name, alias, int(data["version"]), list(data.get("history", [])),
                         float(data.get("updated_at", 0.0)), _weights(data.get("weights")))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            raise RegistryError(f"alias {shown_alias(name, alias)} has an unreadable file; promote it again") from None

    def get(self, name: str, alias: str) -> Alias | None:
        """The alias, or None when it was never set.

        Raises:
            RegistryError: its newest record exists but cannot be read (it is never skipped silently: serving
                a different version than the one promoted would be worse than an error).
        """
        return self._newest(name, alias)[1]

    def all(self, name: str) -> list[Alias]:
        """Every alias of ``name`` that is set, the default one first, then by alias."""
        records: dict[str, list[str]] = {}  # alias -> its record files' base names (one listing for all)
        for f in storage.list_files(storage.join(self.root, name, "aliases"), recursive=True):
            alias, _, record = f.rsplit("/aliases/", 1)[-1].partition("/")
            if record:
                records.setdefault(alias, []).append(record)
            else:  # <alias>.json, written by an older release
                records.setdefault(alias.removesuffix(".json"), [])
        out = []
        for alias, listed in records.items():
            if alias != DEFAULT_ALIAS and not _ALIAS.match(alias):
                continue
            try:
                entry = self._newest(name, alias, listed)[1]
            except RegistryError:
                continue  # a listing never fails on one bad file; resolving that alias reports it
            if entry is not None:
                out.append(entry)
        return sorted(out, key=lambda a: (a.alias != DEFAULT_ALIAS, a.alias))

    def _move(
        self, name: str, alias: str, change: Callable[[Alias | None], Alias | None]
    ) -> tuple[Alias, Alias | None]:
        """Apply ``change`` (old alias -> new alias, or None for no change) as one compare-and-swap; returns
        (the alias now, the one it replaced). A lost race re-reads the winner's record and applies it again."""
        folder = self._records(name, alias)
        for _ in range(_MAX_RACE_TRIES):
            n, old = self._newest(name, alias)
            new = change(old)
            if new is None:
                assert old is not None
                return old, old
            if storage.create_exclusive(storage.join(folder, f"{n + 1:08d}.json"), new.to_json().encode()):
                self._prune(folder, n + 1)
                return new, old
        raise RegistryError(f"{shown_alias(name, alias)} is being moved by too many others at once; retry")

    def _prune(self, folder: str, newest: int) -> None:
        """Best effort: records at least ``_KEPT_RECORDS`` behind the newest are never read again."""
        for f in storage.list_files(folder, recursive=False):
            m = _RECORD.match(f.rsplit("/", 1)[-1])
            if m and int(m.group(1)) <= newest - _KEPT_RECORDS:
                with contextlib.suppress(OSError, StorageError):
                    storage.remove_tree(f)

    def set(
        self, name: str, alias: str, version: int, weights: dict[int, int] | None = None
    ) -> tuple[Alias, int | None]:
        """Point ``alias`` at ``version``, or split it by ``weights`` (version -> positive weight; ``version`` is
        then ignored: the primary is derived). The caller checked the versions are published. Returns (alias,
        previous version or None). Moving an alias to what it already has changes nothing."""
        weights = {v: w for v, w in (weights or {}).items() if w > 0} or None
        if weights is not None and len(weights) == 1:
            version, weights = next(iter(weights)), None
        elif weights is not None:
            version = primary_version(weights)

        def change(old: Alias | None) -> Alias | None:
            if old is not None and old.version == version and old.weights == weights:
                return None
            history = [] if old is None else [*old.history, old._as_history()]
            return Alias(name, alias, version, history[-_MAX_HISTORY:], time.time(), weights)

        new, old = self._move(name, alias, change)
        return new, None if old is None else old.version

    def rollback(self, name: str, alias: str) -> tuple[Alias, int]:
        """Point ``alias`` back at its previous target; returns (alias, the version it pointed at before).

        Raises:
            RegistryError: the alias was never set, or has no previous target.
        """
        label = shown_alias(name, alias)

        def change(old: Alias | None) -> Alias:
            if old is None:
                raise RegistryError(f"{label} has no alias set (it serves the latest version); nothing to roll back")
            if not old.history:
                raise RegistryError(
                    f"{label} -> v{old.version} has no previous target to roll back to; "
                    f"promote another version instead (aigc promote {old.name}:vN)"
                )
            *rest, prev = old.history
            return Alias(name, alias, int(prev["version"]), rest, time.time(), _weights(prev.get("weights")))

        new, old = self._move(name, alias, change)
        assert old is not None
        return new, old.version

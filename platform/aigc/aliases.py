"""Registry aliases: a movable name for one version (``support-bot`` -> v3, ``support-bot:stable`` -> v2).

Layout under the registry root, beside the versions (:mod:`aigc.registry`)::

    <name>/aliases/<alias>.json     {"version": 3, "history": [{"version": 2, "at": ...}, ...], "updated_at": ...}
    <name>/aliases/_default.json    the bare name's alias: what ``model: <name>`` serves (unset = latest)

Each alias file is written whole (:func:`aigc.storage.write_json`: a rename locally, one PUT on object stores),
so a reader sees the old target or the new one, never a torn file; two promotions of one alias at once are
last-writer-wins. ``history`` keeps the previous targets, newest last, so a rollback moves the alias back
without naming a version.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from aigc import storage
from aigc.errors import RegistryError, StorageError

__all__ = ["DEFAULT_ALIAS", "LATEST", "Alias", "AliasStore", "check_alias", "shown_alias"]

DEFAULT_ALIAS = "_default"  # the bare name's alias; cannot clash with a user alias (those start with a letter)
LATEST = "latest"  # reserved: always the newest version, never stored
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
_VERSION_LIKE = re.compile(r"^v[0-9]+$")
_MAX_HISTORY = 50  # previous targets kept per alias (a rollback goes back one at a time)


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

    @property
    def model_id(self) -> str:
        """The id clients pass as ``model`` to reach this alias (``support-bot`` or ``support-bot:stable``)."""
        return shown_alias(self.name, self.alias)

    @property
    def target(self) -> str:
        """The exact version it points at, ``name:vN``."""
        return f"{self.name}:v{self.version}"

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "history": self.history, "updated_at": self.updated_at}, indent=2)


class AliasStore:
    """Aliases of every name under one registry root. Names are validated by the caller (the registry)."""

    def __init__(self, root: str):
        self.root = root

    def _file(self, name: str, alias: str) -> str:
        return storage.join(self.root, name, "aliases", f"{check_alias(alias)}.json")

    def get(self, name: str, alias: str) -> Alias | None:
        """The alias, or None when it was never set.

        Raises:
            RegistryError: the alias file exists but cannot be read (it is never skipped silently: serving a
                different version than the one promoted would be worse than an error).
        """
        path = self._file(name, alias)
        try:
            text = storage.read_text(path)
        except (FileNotFoundError, StorageError, OSError):
            if not storage.exists(path):
                return None
            raise RegistryError(f"alias {shown_alias(name, alias)} cannot be read; promote it again") from None
        try:
            data = json.loads(text)
            return Alias(name, alias, int(data["version"]), list(data.get("history", [])),
                         float(data.get("updated_at", 0.0)))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            raise RegistryError(f"alias {shown_alias(name, alias)} has an unreadable file; promote it again") from None

    def all(self, name: str) -> list[Alias]:
        """Every alias of ``name`` that is set, the default one first, then by alias."""
        out = []
        for f in storage.list_files(storage.join(self.root, name, "aliases"), recursive=False):
            alias = f.rsplit("/", 1)[-1].removesuffix(".json")
            if not f.endswith(".json") or (alias != DEFAULT_ALIAS and not _ALIAS.match(alias)):
                continue
            try:
                entry = self.get(name, alias)
            except RegistryError:
                continue  # a listing never fails on one bad file; resolving that alias reports it
            if entry is not None:
                out.append(entry)
        return sorted(out, key=lambda a: (a.alias != DEFAULT_ALIAS, a.alias))

    def set(self, name: str, alias: str, version: int) -> tuple[Alias, int | None]:
        """Point ``alias`` at ``version`` (the caller checked it is published); returns (alias, previous
        version or None). Moving an alias to the version it already has changes nothing."""
        old = self.get(name, alias)
        if old is not None and old.version == version:
            return old, old.version
        history = [] if old is None else [*old.history, {"version": old.version, "at": old.updated_at}]
        new = Alias(name, alias, version, history[-_MAX_HISTORY:], time.time())
        storage.write_text(self._file(name, alias), new.to_json())
        return new, None if old is None else old.version

    def rollback(self, name: str, alias: str) -> tuple[Alias, int]:
        """Point ``alias`` back at its previous target; returns (alias, the version it pointed at before).

        Raises:
            RegistryError: the alias was never set, or has no previous target.
        """
        old = self.get(name, alias)
        label = shown_alias(name, alias)
        if old is None:
            raise RegistryError(f"{label} has no alias set (it serves the latest version); nothing to roll back")
        if not old.history:
            raise RegistryError(
                f"{label} -> v{old.version} has no previous target to roll back to; "
                f"promote another version instead (aigc promote {old.name}:vN)"
            )
        *rest, prev = old.history
        new = Alias(name, alias, int(prev["version"]), rest, time.time())
        storage.write_text(self._file(name, alias), new.to_json())
        return new, old.version

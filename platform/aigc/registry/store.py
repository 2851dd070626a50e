"""Model registry: name -> versions -> {weights dir, kind, base model and its commit, metrics, config, data hash}.

Layout under ``registry_dir`` (a local directory or an ``s3://`` / ``gs://`` URI, through :mod:`aigc.storage`)::

    <name>/v<N>/.claim          created exclusively: whoever creates it owns version N
    <name>/v<N>/adapter/        a plain PEFT directory (kind "lora") or a whole model directory (kind "full")
    <name>/v<N>/meta.json       base model (+ hub commit), metrics, config, data hash, created_at; written last
    <name>/aliases/<alias>.json movable names for a version (:mod:`aigc.registry.aliases`)

A version is published when its ``meta.json`` exists: readers never see a half-copied directory, and two
concurrent registrations of one name get two different versions. Names and model ids are validated on every
read as well as every write, so no id reaches outside the registry root.

Model ids: ``name:vN`` is one version; ``name:ALIAS`` (``support-bot:stable``) is what the alias points at;
the bare ``name`` is its default alias when one was promoted, else the latest version (``name:latest``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from aigc import storage
from aigc.errors import RegistryError, StorageError
from aigc.registry.aliases import DEFAULT_ALIAS, LATEST, Alias, AliasStore, check_alias, shown_alias

__all__ = ["AdapterVersion", "Alias", "Registry", "RegistryError", "content_hash", "model_kind"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_DIR = re.compile(r"^v([1-9][0-9]{0,8})$")
_VERSION_LIKE = re.compile(r"^v[0-9]+$")  # a version reference (v0 and v0007 are refused by name)
_MAX_SHOWN = 80  # characters of a bad id echoed back in an error message
_MAX_CLAIM_TRIES = 1000

Kind = Literal["lora", "full"]


def _shown(text: str) -> str:
    text = text.replace("\x00", "\\0")
    return repr(text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "...")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise RegistryError(
            f"invalid model name {_shown(str(name))}: use 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name


def model_kind(path: str) -> Kind:
    """``lora`` for a PEFT adapter directory, ``full`` for a whole model directory.

    Raises:
        RegistryError: the directory is neither.
    """
    if storage.is_file(storage.join(path, "adapter_config.json")):
        return "lora"
    has_weights = any(f.endswith((".safetensors", ".bin")) for f in storage.list_files(path, recursive=False))
    if storage.is_file(storage.join(path, "config.json")) and has_weights:
        return "full"
    raise RegistryError(
        f"{path} is neither a PEFT adapter directory (adapter_config.json) nor a model directory "
        "(config.json + weights)"
    )


def content_hash(path: str) -> str:
    """sha256 over every file under ``path``: its relative name and its bytes, in name order (local or URI)."""
    fs, root = storage.filesystem(path)
    digest = hashlib.sha256()
    for f in storage.list_files(path):
        inner = f.split("://", 1)[-1]  # the path inside ``fs``
        digest.update(inner[len(root) :].lstrip("/").encode() + b"\0")
        with fs.open_input_stream(inner) as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass
class AdapterVersion:
    """One published version. ``adapter_uri`` holds the weights (a LoRA adapter or, for ``full``, a model)."""

    name: str
    version: int
    base_model: str
    adapter_uri: str
    kind: Kind = "lora"
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    data_hash: str | None = None
    created_at: float = 0.0
    base_model_commit: str | None = None  # the hub commit trained on; None for a local directory
    content_hash: str | None = None  # sha256 of the weights directory (file names and bytes); see register()
    runtime: bool = False  # loaded into the servers by name (aigc.registry.runtime), not a registered version

    @property
    def model_id(self) -> str:
        """The id clients pass as ``model`` to reach exactly this version (a runtime adapter: its name)."""
        return self.name if self.runtime else f"{self.name}:v{self.version}"

    @classmethod
    def from_json(cls, text: str) -> AdapterVersion:
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Registry:
    """Registered models under one root; safe to read while other processes register."""

    def __init__(self, root: str):
        self.root = storage.resolve(root)
        self._aliases = AliasStore(self.root)

    def _path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # 1. writing
    def register(
        self,
        name: str,
        src_dir: str,
        base_model: str,
        metrics: dict[str, float] | None = None,
        config: dict[str, Any] | None = None,
        data_hash: str | None = None,
        base_model_commit: str | None = None,
    ) -> AdapterVersion:
        """Copy ``src_dir`` (a PEFT adapter or a whole model directory) in as the next version of ``name``.

        Idempotent: when a version of ``name`` already holds the same files (:func:`content_hash`) for the same
        base model, that version is returned and nothing is written, so a run re-registering its result after
        a kill (between registering and recording it) creates no duplicate.

        ``base_model`` is the hub id or directory trained on, ``base_model_commit`` its hub commit (if any).

        Raises:
            RegistryError: invalid name, or ``src_dir`` holds neither an adapter nor a model.
        """
        _check_name(name)
        kind = model_kind(src_dir)
        digest = content_hash(src_dir)
        for v in reversed(self.versions(name)):  # the same weights again (a re-run after a kill): no new version
            existing = self._read(name, v)
            if existing is not None and existing.content_hash == digest and existing.base_model == base_model:
                logger.info("%s holds these weights already; not registered again", existing.model_id)
                return existing
        version = self._claim(name)
        vdir = self._path(name, f"v{version}")
        storage.copy_dir(src_dir, storage.join(vdir, "adapter"))
        entry = AdapterVersion(
            name=name,
            version=version,
            base_model=base_model,
            adapter_uri=storage.join(vdir, "adapter"),
            kind=kind,
            metrics=dict(metrics or {}),
            config=dict(config or {}),
            data_hash=data_hash,
            created_at=time.time(),
            base_model_commit=base_model_commit,
            content_hash=digest,
        )
        storage.write_text(storage.join(vdir, "meta.json"), json.dumps(asdict(entry), indent=2, default=str))
        return entry

    def _claim(self, name: str) -> int:
        """The next free version number of ``name``, claimed atomically (create-if-absent)."""
        taken = [int(m.group(1)) for d in storage.list_dirs(self._path(name)) if (m := _VERSION_DIR.match(d))]
        version = max(taken, default=0) + 1
        token = f"{os.getpid()}-{uuid.uuid4().hex}".encode()
        for _ in range(_MAX_CLAIM_TRIES):
            if storage.create_exclusive(self._path(name, f"v{version}", ".claim"), token):
                return version
            version += 1
        raise RegistryError(f"could not claim a version of {name!r} after {_MAX_CLAIM_TRIES} tries")

    # 2. reading
    def names(self) -> list[str]:
        """Names with at least one published version."""
        return [n for n in storage.list_dirs(self.root) if _NAME.match(n) and self.versions(n)]

    def versions(self, name: str) -> list[int]:
        """Published versions of ``name`` (those whose meta.json exists), ascending."""
        _check_name(name)
        base = self._path(name)
        published = {
            f[len(base) :].strip("/").split("/")[0] for f in storage.list_files(base) if f.endswith("/meta.json")
        }
        return sorted(int(m.group(1)) for d in published if (m := _VERSION_DIR.match(d)))

    def get(self, name: str, version: int | None = None) -> AdapterVersion:
        """One version (the latest when ``version`` is None).

        Raises:
            RegistryError: no such name or version, or its meta.json is unreadable.
        """
        if version is not None and storage.is_file(self._path(_check_name(name), f"v{version}", "meta.json")):
            v = version  # the common case, one lookup: a listing of every version is only needed for errors
        else:
            versions = self.versions(name)
            if not versions:
                raise RegistryError(f"no model named {name!r} in registry {self.root}")
            v = versions[-1] if version is None else version
            if v not in versions:
                raise RegistryError(f"model {name!r} has no version {v} (have {versions})")
        entry = self._read(name, v)
        if entry is None:
            raise RegistryError(f"model {name}:v{v} has an unreadable meta.json in registry {self.root}")
        return entry

    def _read(self, name: str, version: int) -> AdapterVersion | None:
        path = self._path(name, f"v{version}", "meta.json")
        try:
            return AdapterVersion.from_json(storage.read_text(path))
        except (
            ValueError,
            TypeError,
            StorageError,
            FileNotFoundError,
            IsADirectoryError,
            PermissionError,
        ) as exc:  # torn or foreign file: skip, never fail a listing (an unreachable store raises: see resolver)
            logger.warning("skipping %s:v%d: unreadable meta.json (%s)", name, version, exc)
            return None

    def resolve(self, model_id: str) -> AdapterVersion:
        """``name``, ``name:vN``, ``name:latest`` or ``name:ALIAS`` -> the version it names now.

        Raises:
            RegistryError: a malformed id (never touches storage) or one naming nothing registered.
        """
        if not isinstance(model_id, str) or len(model_id) > 140 or model_id.count(":") > 1:
            raise RegistryError(f"invalid model id {_shown(str(model_id))}: expected name, name:vN or name:ALIAS")
        name, _, ref = model_id.partition(":")
        _check_name(name)
        if _VERSION_LIKE.match(ref):
            m = _VERSION_DIR.match(ref)
            if not m:
                raise RegistryError(f"model id {_shown(model_id)}: version must look like v3")
            return self.get(name, int(m.group(1)))
        if ref == LATEST:
            return self.get(name)
        try:
            target = self._aliases.get(name, ref or DEFAULT_ALIAS)
        except RegistryError as exc:
            if ref:  # a malformed alias: name the id, never a path
                raise RegistryError(f"model id {_shown(model_id)}: {exc}") from None
            raise
        if target is not None:
            return self.get(name, target.version)
        if ref:
            known = [a.model_id for a in self._aliases.all(name)]
            raise RegistryError(
                f"model {name!r} has no alias {ref!r} (aliases: {', '.join(known) or 'none'}; "
                f"versions: {self.versions(name)}); set it with: aigc promote {name}:vN --alias {ref}"
            )
        return self.get(name)

    # 3. aliases
    def promote(self, target: str, alias: str | None = None) -> tuple[Alias, int | None]:
        """Point ``alias`` of ``target``'s name (default: the bare name) at the version ``target`` names now.

        Args:
            target: ``name:vN``, or any id :meth:`resolve` takes (``name:canary`` promotes what it points at).
            alias: ``stable``, ``canary``...; None = the bare name, what ``model: name`` serves.

        Returns:
            The alias as written and the version it pointed at before (None if it was unset).

        Raises:
            RegistryError: the target names no published version (the message lists the known ones), or a
                malformed alias.
        """
        entry = self.resolve(target)
        return self._aliases.set(entry.name, check_alias(alias or DEFAULT_ALIAS), entry.version)

    def rollback(self, name: str, alias: str | None = None) -> tuple[Alias, int]:
        """Point ``alias`` of ``name`` (default: the bare name) back at its previous target.

        Returns:
            The alias as written and the version it pointed at before the rollback.

        Raises:
            RegistryError: the alias was never set or has no previous target; or the previous target is
                no longer published.
        """
        _check_name(name)
        alias = check_alias(alias or DEFAULT_ALIAS)
        current = self._aliases.get(name, alias)
        if current is not None and current.history:
            prev = current.history[-1]
            published = self.versions(name)
            for v in sorted({int(prev["version"]), *(int(k) for k in prev.get("weights") or {})}):
                if v not in published:
                    raise RegistryError(
                        f"{shown_alias(name, alias)} cannot roll back to v{v}: it is no longer published"
                    )
        return self._aliases.rollback(name, alias)

    def set_traffic(self, name: str, weights: dict[int, int], alias: str | None = None) -> tuple[Alias, Alias | None]:
        """Split ``alias`` of ``name`` (default: the bare name) between versions by weight
        (``{3: 90, 4: 10}``: about one request in ten to v4); one version is a plain promote.

        Returns:
            The alias as written and the one it replaced (None if it was unset).

        Raises:
            RegistryError: a weight that is not a non-negative integer, no positive weight, a version that is
                not published, or a malformed alias.
        """
        _check_name(name)
        alias = check_alias(alias or DEFAULT_ALIAS)
        bad = {v: w for v, w in weights.items() if not isinstance(w, int) or isinstance(w, bool) or w < 0}
        if bad or not any(w > 0 for w in weights.values()):
            raise RegistryError(
                "traffic weights must be whole numbers >= 0 with at least one above 0, e.g. v3=90 v4=10; got "
                + " ".join(f"v{v}={w}" for v, w in weights.items())
            )
        published = self.versions(name)
        missing = [v for v, w in weights.items() if w > 0 and v not in published]
        if missing:
            raise RegistryError(
                f"{name} has no published version {', '.join(f'v{v}' for v in missing)} (versions: {published})"
            )
        before = self._aliases.get(name, alias)
        new, _ = self._aliases.set(name, alias, 0, weights)
        return new, before

    def resolve_split(self, model_id: str) -> list[tuple[AdapterVersion, int]]:
        """What :meth:`resolve` names, as (version, weight) pairs: several for an alias split by
        :meth:`set_traffic` (``resolve`` gives its primary version), else one with weight 1.

        Raises:
            RegistryError: as :meth:`resolve`.
        """
        entry = self.resolve(model_id)
        name, _, ref = model_id.partition(":")
        if _VERSION_LIKE.match(ref) or ref == LATEST:
            return [(entry, 1)]
        target = self._aliases.get(name, ref or DEFAULT_ALIAS)
        if target is None or not target.weights:
            return [(entry, 1)]
        return [(entry if v == entry.version else self.get(name, v), w) for v, w in target.split]

    def aliases(self, name: str | None = None) -> list[Alias]:
        """The aliases that are set, of ``name`` or of every name."""
        names = [_check_name(name)] if name is not None else self.names()
        return [a for n in names for a in self._aliases.all(n)]

    def list(self, known: dict[str, AdapterVersion] | None = None) -> list[AdapterVersion]:
        """Every published version of every name (unreadable entries skipped), ascending.

        Args:
            known: versions read before, by model id (``name:vN``); a published version never changes, so
                these are reused instead of read again (a refresh then costs one read per new version).
        """
        out = []
        for name in storage.list_dirs(self.root):
            if not _NAME.match(name):
                continue
            for v in self.versions(name):
                entry = (known or {}).get(f"{name}:v{v}") or self._read(name, v)
                if entry is not None:
                    out.append(entry)
        return out

    def local_adapter_dir(self, entry: AdapterVersion, cache_dir: str | None = None) -> str:
        """A local directory holding the version's weights; remote registries are copied into a cache first."""
        return storage.local_dir(entry.adapter_uri, cache_dir)

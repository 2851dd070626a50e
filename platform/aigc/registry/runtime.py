"""Adapters loaded into the running servers by name, without registering a version (``POST /v1/adapters``).

What vLLM's ``load_lora_adapter`` offers, made to hold across replicas: the record lives next to the registry,
``<registry_dir>/_runtime/<name>.json`` (written whole; a registered name cannot start with ``_``), so every
replica of every app on this registry resolves the name, a replica started later by the autoscaler included, and
a restart keeps it. ``DELETE /v1/adapters/NAME`` removes the record; each generator replica unloads the weights
within its sweep period (:mod:`aigc.serve.generator`).

Names share the registry's namespace: a name with registered versions cannot be loaded (they would shadow each
other), and a registered name always wins over a record written before it was registered.

:class:`ServedModels` is what a server resolves ids against: the registry first, then these records.
"""

from __future__ import annotations

import time
from typing import Any

from aigc import storage
from aigc.errors import RegistryError, StorageError
from aigc.registry.aliases import LATEST
from aigc.registry.store import AdapterVersion, Alias, Registry, _check_name

__all__ = ["RuntimeAdapters", "ServedModels"]

_DIR = "_runtime"


class RuntimeAdapters:
    """The runtime adapter records under one registry root."""

    def __init__(self, registry_root: str):
        self.root = storage.join(registry_root, _DIR)

    def _path(self, name: str) -> str:
        return storage.join(self.root, f"{_check_name(name)}.json")

    def get(self, name: str) -> AdapterVersion | None:
        """The record of ``name``, None when there is none (or it cannot be parsed)."""
        path = self._path(name)
        if not storage.is_file(path):
            return None
        try:
            return _entry(storage.read_json(path))
        except (ValueError, TypeError, KeyError, StorageError, FileNotFoundError):
            return None

    def list(self) -> list[AdapterVersion]:
        """Every record, by name."""
        names = [f.rsplit("/", 1)[-1][: -len(".json")] for f in storage.list_files(self.root, recursive=False)
                 if f.endswith(".json")] if storage.is_dir(self.root) else []  # fmt: skip
        return [e for n in sorted(names) if (e := self.get(n)) is not None]

    def add(self, name: str, adapter_uri: str, base_model: str, loaded_by: str | None) -> AdapterVersion:
        """Record ``name`` -> ``adapter_uri`` (replacing a record of the same name)."""
        record = {"name": name, "adapter_uri": adapter_uri, "base_model": base_model, "loaded_at": time.time(),
                  "loaded_by": loaded_by}  # fmt: skip
        storage.write_json(self._path(name), record)
        return _entry(record)

    def remove(self, name: str) -> bool:
        """Delete the record of ``name``; False when there was none."""
        path = self._path(name)
        if not storage.is_file(path):
            return False
        storage.remove_tree(path)
        return True


def _entry(record: dict[str, Any]) -> AdapterVersion:
    return AdapterVersion(name=record["name"], version=0, base_model=record["base_model"],
                          adapter_uri=record["adapter_uri"], kind="lora", created_at=float(record["loaded_at"]),
                          config={"loaded_by": record.get("loaded_by")}, runtime=True)  # fmt: skip


class ServedModels:
    """The registry and the runtime adapters beside it, read as one (the interface the resolver and the
    generator use): a registered name or id first; a bare name with no registered version may be a runtime
    adapter."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.runtime = RuntimeAdapters(registry.root)

    def _runtime(self, model_id: str, exc: RegistryError) -> AdapterVersion:
        name, _, ref = model_id.partition(":")
        entry = self.runtime.get(name) if ref in ("", LATEST) and not self.registry.versions(name) else None
        if entry is None:
            raise exc
        return entry

    def resolve(self, model_id: str) -> AdapterVersion:
        """As :meth:`Registry.resolve`, then the runtime adapters."""
        try:
            return self.registry.resolve(model_id)
        except RegistryError as exc:
            return self._runtime(model_id, exc)

    def resolve_split(self, model_id: str) -> list[tuple[AdapterVersion, int]]:
        """As :meth:`Registry.resolve_split`, then the runtime adapters (weight 1)."""
        try:
            return self.registry.resolve_split(model_id)
        except RegistryError as exc:
            return [(self._runtime(model_id, exc), 1)]

    def list(self, known: dict[str, AdapterVersion] | None = None) -> list[AdapterVersion]:
        """Every registered version, then every runtime adapter whose name is not registered."""
        versions = self.registry.list(known)
        names = {e.name for e in versions}
        return versions + [e for e in self.runtime.list() if e.name not in names]

    def aliases(self) -> list[Alias]:
        return self.registry.aliases()

    def local_adapter_dir(self, entry: AdapterVersion, cache_dir: str | None = None) -> str:
        return self.registry.local_adapter_dir(entry, cache_dir)

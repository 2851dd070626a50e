"""Adapter registry: name -> versions -> {adapter dir, base model, metrics, config, data hash}.

Layout under ``registry_dir`` (a local directory or an ``s3://`` / ``gs://`` URI, through pyarrow.fs)::

    <name>/v<N>/adapter/        a plain PEFT directory (adapter_config.json, adapter_model.safetensors)
    <name>/v<N>/meta.json       base model, metrics, config, data hash, created_at

A version is published by writing ``meta.json`` last, so a reader never sees a half-copied adapter.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from aigc.errors import RegistryError

__all__ = ["AdapterVersion", "Registry", "RegistryError"]

_VERSION_DIR = re.compile(r"^v(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class AdapterVersion:
    name: str
    version: int
    base_model: str
    adapter_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    data_hash: str | None = None
    created_at: float = 0.0

    @property
    def model_id(self) -> str:
        """The id clients pass as ``model`` to reach exactly this version."""
        return f"{self.name}:v{self.version}"


def _fs_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


class Registry:
    """Registered adapters under one root; safe to read while another process registers."""

    def __init__(self, root: str):
        self.root = root
        self._fs, self._path = _fs_and_path(root)

    # 1. writing
    def register(
        self,
        name: str,
        adapter_dir: str,
        base_model: str,
        metrics: dict[str, float] | None = None,
        config: dict[str, Any] | None = None,
        data_hash: str | None = None,
    ) -> AdapterVersion:
        """Copy a local PEFT directory in as the next version of ``name`` and return it."""
        if not _NAME.match(name):
            raise RegistryError(f"adapter name {name!r} must match {_NAME.pattern}")
        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise RegistryError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
        self._fs.create_dir(f"{self._path}/{name}", recursive=True)
        version = max(self.versions(name), default=0) + 1
        # Claim the version directory; a concurrent writer that races us to it moves on to the next number.
        while True:
            vdir = f"{self._path}/{name}/v{version}"
            if self._fs.get_file_info(vdir).type == pafs.FileType.NotFound:
                break
            version += 1
        self._fs.create_dir(f"{vdir}/adapter", recursive=True)
        pafs.copy_files(os.path.abspath(adapter_dir), f"{vdir}/adapter", destination_filesystem=self._fs)
        entry = AdapterVersion(
            name=name,
            version=version,
            base_model=base_model,
            adapter_uri=self._uri(f"{vdir}/adapter"),
            metrics=dict(metrics or {}),
            config=dict(config or {}),
            data_hash=data_hash,
            created_at=time.time(),
        )
        with self._fs.open_output_stream(f"{vdir}/meta.json") as f:
            f.write(json.dumps(asdict(entry), indent=2, default=str).encode())
        return entry

    # 2. reading
    def names(self) -> list[str]:
        if self._fs.get_file_info(self._path).type != pafs.FileType.Directory:
            return []
        infos = self._fs.get_file_info(pafs.FileSelector(self._path))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and self.versions(i.base_name))

    def versions(self, name: str) -> list[int]:
        """Published versions of ``name`` (those whose meta.json exists), ascending."""
        base = f"{self._path}/{name}"
        if self._fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        out = []
        for info in self._fs.get_file_info(pafs.FileSelector(base)):
            m = _VERSION_DIR.match(info.base_name)
            if m and self._fs.get_file_info(f"{info.path}/meta.json").type == pafs.FileType.File:
                out.append(int(m.group(1)))
        return sorted(out)

    def get(self, name: str, version: int | None = None) -> AdapterVersion:
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"no adapter named {name!r} in registry {self.root}")
        v = versions[-1] if version is None else version
        if v not in versions:
            raise RegistryError(f"adapter {name!r} has no version {v} (have {versions})")
        with self._fs.open_input_stream(f"{self._path}/{name}/v{v}/meta.json") as f:
            return AdapterVersion(**json.loads(f.read().decode()))

    def resolve(self, model_id: str) -> AdapterVersion:
        """``name`` (latest version) or ``name:vN`` -> that version."""
        name, _, ver = model_id.partition(":")
        if ver:
            if not _VERSION_DIR.match(ver):
                raise RegistryError(f"model id {model_id!r}: version must look like v3")
            return self.get(name, int(ver[1:]))
        return self.get(name)

    def list(self) -> list[AdapterVersion]:
        """Every published version of every adapter."""
        return [self.get(n, v) for n in self.names() for v in self.versions(n)]

    def local_adapter_dir(self, entry: AdapterVersion, cache_dir: str | None = None) -> str:
        """A local directory holding the adapter; remote registries are copied into a cache first."""
        if "://" not in entry.adapter_uri:
            return entry.adapter_uri
        cache = Path(cache_dir or tempfile.gettempdir()) / "aigc-adapters" / entry.name / f"v{entry.version}"
        if not (cache / "adapter_config.json").is_file():
            cache.mkdir(parents=True, exist_ok=True)
            fs, path = pafs.FileSystem.from_uri(entry.adapter_uri)
            pafs.copy_files(path, str(cache), source_filesystem=fs)
        return str(cache)

    def _uri(self, path: str) -> str:
        if "://" in self.root:
            scheme = self.root.split("://", 1)[0]
            return f"{scheme}://{path.lstrip('/')}"
        return path

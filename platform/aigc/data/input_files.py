"""The input files of ``data.path``: every source entry resolved to files, and their content hashes.

An entry is a file, a directory (read recursively) or a glob (``*``, ``?``, ``[...]``, ``**``), local or on
``s3://``/``gs://``. pyarrow filesystems have no glob, so a glob lists its fixed prefix once and matches each
path component with :func:`fnmatch.fnmatchcase` (``**`` spans any number of directories). Names starting with
``.`` or ``_`` (``.git``, ``_SUCCESS``, ``_temporary``) are skipped in directories and by wildcards, as Ray Data
and Spark do; a glob component that itself starts with ``.``/``_`` still matches them.

Resolution needs no cluster, so a wrong entry fails before any Ray work. Hashing (:func:`hash_inputs`) runs
one small Ray task per file, so a file on an object store is streamed by the cluster, not the driver.
"""

from __future__ import annotations

import hashlib
import os
from fnmatch import fnmatchcase
from typing import Any, NamedTuple

import pyarrow.fs as pafs

from aigc import storage
from aigc.config import DataConfig
from aigc.errors import DataError

__all__ = ["SUPPORTED_EXTENSIONS", "InputFile", "hash_inputs", "list_input_files", "source_label"]

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
_GLOB_CHARS = frozenset("*?[")
_HASH_CHUNK = 4 << 20  # bytes read per step while hashing: memory stays flat whatever the file size


class InputFile(NamedTuple):
    path: str  # local absolute path or URI (scheme kept)
    source: int  # index into data.sources()
    size: int  # bytes


def source_label(data: DataConfig, index: int) -> str:
    """How errors name a source: ``data.path`` alone, or ``data.path[i]`` in a list."""
    return f"data.path[{index}]" if isinstance(data.path, list) else "data.path"


def list_input_files(data: DataConfig) -> list[InputFile]:
    """Every input file of every source of ``data``, in source order and sorted by path within a source.

    Raises:
        DataError: an entry is missing, matches nothing, is an empty directory or holds an unsupported file;
            the message names the entry and what was expected.
    """
    files: list[InputFile] = []
    for i, src in enumerate(data.sources()):
        label = f"{source_label(data, i)} ({src.path})"
        found = _resolve(src.path, label)
        bad = [p for p, _ in found if not p.endswith(SUPPORTED_EXTENSIONS)]
        if bad:
            raise DataError(
                f"{label}: unsupported file type {bad[0]!r}; expected one of {', '.join(SUPPORTED_EXTENSIONS)} "
                "(narrow the glob or move other files out of the directory)"
            )
        files += [InputFile(p, i, size) for p, size in found]
    return files


def _resolve(path: str, label: str) -> list[tuple[str, int]]:
    """(path, size) of the files of one entry, sorted; raises DataError when there are none."""
    prefix, pattern = _split_glob(path if storage.is_uri(path) else os.path.abspath(os.path.expanduser(path)))
    fs, root = storage.filesystem(prefix)
    scheme = path.split("://", 1)[0] + "://" if storage.is_uri(path) else ""
    if pattern is None:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            return [(scheme + info.path, info.size)]
        if info.type != pafs.FileType.Directory:
            raise DataError(f"{label}: no such file or directory: {path}")
        found = [(i.path, i.size) for i in _walk(fs, root) if not _hidden(_relative(i.path, root))]
        if not found:
            raise DataError(
                f"{label}: {path} is an empty directory; expected {', '.join(SUPPORTED_EXTENSIONS)} files in it "
                "(names starting with '.' or '_' are skipped)"
            )
    else:
        segments = pattern.split("/")
        deep = "**" in segments or len(segments) > 1  # one level to list for `dir/*.jsonl`
        found = [(i.path, i.size) for i in _walk(fs, root, deep) if _match(segments, _relative(i.path, root))]
        if not found:
            raise DataError(
                f"{label}: no file matches the glob {path}; expected at least one "
                f"{', '.join(SUPPORTED_EXTENSIONS)} file (names starting with '.' or '_' match only a pattern "
                "that starts with that character)"
            )
    return sorted((scheme + p, size) for p, size in found)


def _split_glob(path: str) -> tuple[str, str | None]:
    """``("s3://b/data", "2024-*/*.jsonl")`` for ``s3://b/data/2024-*/*.jsonl``; ``(path, None)`` without a glob."""
    head, sep, rest = path.partition("://")
    parts = (rest if sep else head).split("/")
    first = next((k for k, p in enumerate(parts) if _GLOB_CHARS & set(p)), None)
    if first is None:
        return path, None
    fixed = "/".join(parts[:first]) or "/"
    return (f"{head}://{fixed}" if sep else fixed), "/".join(parts[first:])


def _walk(fs: pafs.FileSystem, root: str, recursive: bool = True) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(root, allow_not_found=True, recursive=recursive)
    return [i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]


def _relative(path: str, root: str) -> list[str]:
    return path[len(root.rstrip("/")) :].strip("/").split("/")


def _hidden(parts: list[str]) -> bool:
    return any(p.startswith((".", "_")) for p in parts)


def _match(segments: list[str], parts: list[str]) -> bool:
    """Whether path components ``parts`` match glob ``segments`` (``**`` = any number of visible directories)."""
    if not segments:
        return not parts
    seg = segments[0]
    if seg == "**":
        for k in range(len(parts) + 1):
            if _match(segments[1:], parts[k:]):
                return True
            if k < len(parts) and _hidden(parts[k : k + 1]):
                return False
        return False
    if not parts or not fnmatchcase(parts[0], seg):
        return False
    if parts[0].startswith((".", "_")) and not seg.startswith(parts[0][0]):
        return False
    return _match(segments[1:], parts[1:])


def _sha256(f: InputFile) -> dict[str, Any]:
    fs, inner = storage.filesystem(f.path)
    h, n = hashlib.sha256(), 0
    with fs.open_input_stream(inner) as stream:
        while chunk := stream.read(_HASH_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return {"path": f.path, "source": f.source, "bytes": n, "sha256": h.hexdigest()}


def hash_inputs(files: list[InputFile]) -> list[Any]:
    """Start hashing every file: one Ray task each (a tenth of a CPU: it mostly waits on I/O).

    Returns object refs, one per file, each resolving to ``{path, source, bytes, sha256}``; ``ray.get`` them
    when the digests are needed, so hashing overlaps the job. Local files are hashed on this node, where they
    were listed; files on object stores anywhere in the cluster.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0.1, max_retries=3)(_sha256)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return [task.options(scheduling_strategy="DEFAULT" if storage.is_uri(f.path) else here).remote(f) for f in files]

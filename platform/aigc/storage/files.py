"""Files under one filesystem layer, local or ``s3://``/``gs://`` alike (pyarrow filesystems): paths, whole-or-nothing
writes, the atomic create-if-absent, listing, copying and removing trees.

Writes are whole or nothing (a temporary file, flushed with ``fsync``, renamed into place locally, and the
directory synced so the rename survives a power loss; one PUT on object stores), and a failed write (a full disk)
leaves its temporary file removed and the previous content readable. An S3-compatible endpoint is taken from the
standard ``AWS_ENDPOINT_URL`` (with the usual ``AWS_*`` credentials), as boto3 does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs

from aigc.errors import StorageError

__all__ = [
    "copy_dir",
    "create_exclusive",
    "exists",
    "filesystem",
    "filesystem_for_ray",
    "is_dir",
    "is_file",
    "is_uri",
    "join",
    "list_dirs",
    "list_files",
    "local_dir",
    "local_staging",
    "makedirs",
    "read_bytes",
    "read_json",
    "read_text",
    "remove_tree",
    "resolve",
    "write_bytes",
    "write_json",
    "write_text",
]


def is_uri(path: str) -> bool:
    """Whether ``path`` names an object store or other filesystem by scheme (``s3://``, ``gs://``...)."""
    return "://" in path


def resolve(path: str) -> str:
    """A local path made absolute (``~`` expanded); a URI without its trailing slash."""
    if is_uri(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """``os.path.join`` for local paths; ``/``-joined for URIs (``join("s3://b/x", "ray") == "s3://b/x/ray"``)."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or URI, as Ray Data and pyarrow take them.

    Raises:
        StorageError: the scheme is unknown or the filesystem cannot be opened.
    """
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    scheme = path.split("://", 1)[0]
    try:
        if scheme == "s3" and os.environ.get("AWS_ENDPOINT_URL"):
            endpoint = os.environ["AWS_ENDPOINT_URL"]
            fs = pafs.S3FileSystem(
                endpoint_override=endpoint.split("://", 1)[-1],
                scheme=endpoint.split("://", 1)[0] if "://" in endpoint else "https",
                region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            )
            return fs, path.split("://", 1)[1].rstrip("/")
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner.rstrip("/")
    except Exception as exc:
        raise StorageError(f"cannot open {path}: {exc}") from exc


def _info(path: str) -> pafs.FileInfo:
    fs, p = filesystem(path)
    return fs.get_file_info(p)


def exists(path: str) -> bool:
    return _info(path).type != pafs.FileType.NotFound


def is_file(path: str) -> bool:
    return _info(path).type == pafs.FileType.File


def is_dir(path: str) -> bool:
    return _info(path).type == pafs.FileType.Directory


def makedirs(path: str) -> None:
    fs, p = filesystem(path)
    fs.create_dir(p, recursive=True)


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (a reader never sees a torn file)."""
    if is_uri(path):
        fs, p = filesystem(path)
        with fs.open_output_stream(p) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _write_temp(path: str, data: bytes) -> str:
    """``data`` in a new temporary file beside ``path``, flushed to disk; removed again if writing fails (a full
    disk leaves no partial temporary file behind)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def _fsync_dir(path: str) -> None:
    """Make a rename or a new name in directory ``path`` survive a power loss (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, obj: Any, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, default=str))


def create_exclusive(path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` only if it does not exist: True if this call created it, False if it existed.

    Atomic across processes and machines, and a reader never sees the file half-written: local files are
    written aside and hard-linked in (``O_CREAT | O_EXCL`` where links are unsupported); ``s3://`` through a
    conditional PUT (``If-None-Match: *``, boto3); ``gs://`` through a generation-match precondition
    (google-cloud-storage). The registry claims versions with it.

    Raises:
        StorageError: the scheme has no atomic create here, or the client library is missing.
    """
    if not is_uri(path):
        # The content is written first and then linked in under the final name (link fails if the name
        # exists): a reader never sees the file empty or half-written, unlike O_EXCL followed by a write.
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = _write_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: create-if-absent, then write
            return _create_exclusive_unlinked(path, data)
        finally:
            _remove_quietly(tmp)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
        return True
    scheme, rest = path.split("://", 1)
    bucket, _, key = rest.partition("/")
    if scheme == "s3":
        return _s3_create_exclusive(bucket, key, data, path)
    if scheme in ("gs", "gcs"):
        return _gcs_create_exclusive(bucket, key, data, path)
    raise StorageError(f"{path}: no atomic create-if-absent for {scheme}:// (use a local path, s3:// or gs://)")


def _create_exclusive_unlinked(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def _s3_create_exclusive(bucket: str, key: str, data: bytes, path: str) -> bool:
    try:
        import boto3
        from botocore.exceptions import ClientError
    except ImportError as exc:
        raise StorageError(
            f"{path}: claiming a file on s3:// needs boto3: the [s3] extra (pip install -e '.[s3]' in the checkout)"
        ) from exc
    client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise StorageError(f"{path}: {exc}") from exc
    return True


def _gcs_create_exclusive(bucket: str, key: str, data: bytes, path: str) -> bool:
    try:
        from google.api_core.exceptions import PreconditionFailed
        from google.cloud import storage as gcs
    except ImportError as exc:
        raise StorageError(
            f"{path}: claiming a file on gs:// needs google-cloud-storage: the [gcs] extra "
            "(pip install -e '.[gcs]' in the checkout)"
        ) from exc
    try:
        gcs.Client().bucket(bucket).blob(key).upload_from_string(data, if_generation_match=0)
    except PreconditionFailed:
        return False
    return True


def list_files(path: str, recursive: bool = True) -> list[str]:
    """Files under ``path`` (with the URI scheme kept), sorted; a single file lists itself; missing -> []."""
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=recursive))
    prefix = path.split("://", 1)[0] + "://" if is_uri(path) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File)


def list_dirs(path: str) -> list[str]:
    """Base names of the immediate child directories of ``path`` (one listing call)."""
    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(p)) if i.type == pafs.FileType.Directory)


def copy_dir(src: str, dst: str) -> None:
    """Copy a directory tree between any two filesystems (local or URI on either side)."""
    sfs, sp = filesystem(src)
    dfs, dp = filesystem(dst)
    dfs.create_dir(dp, recursive=True)
    pafs.copy_files(sp, dp, source_filesystem=sfs, destination_filesystem=dfs)


def remove_tree(path: str) -> None:
    """Delete a directory tree or file; a missing path is fine."""
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif info.type == pafs.FileType.File:
        fs.delete_file(p)


def local_dir(path: str, cache_root: str | None = None) -> str:
    """A local directory holding the tree at ``path``: local paths as they are; a URI is downloaded once into a
    cache keyed by the hash of the whole URI, filled in a temporary directory and renamed into place (a
    concurrent filler that loses the rename discards its copy)."""
    if not is_uri(path):
        return path
    root = os.path.join(cache_root or tempfile.gettempdir(), "aigc-cache")
    dest = os.path.join(root, hashlib.sha256(path.encode()).hexdigest()[:24])
    if os.path.isdir(dest):
        return dest
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".fill-")
    copy_dir(path, tmp)
    try:
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@contextlib.contextmanager
def local_staging(path: str) -> Iterator[str]:
    """A local directory to write into (for libraries that only take local paths, e.g. matplotlib); uploaded
    to ``path`` on exit when it is a URI, or ``path`` itself when it is local."""
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="aigc-stage-") as tmp:
        yield tmp
        copy_dir(tmp, path)


def filesystem_for_ray(path: str) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` as Ray Train and Tune ``RunConfig`` take them."""
    if not is_uri(path):
        return os.path.abspath(path), None
    fs, p = filesystem(path)
    return p, fs

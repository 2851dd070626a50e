"""Base models from the Hugging Face hub: resolved once on the driver, opened from a local copy everywhere else.

1. **Resolve** (:func:`resolve_model`, on the driver, before any Ray work): a hub id at ``model.revision``
   (default ``main``) becomes one exact commit, downloaded once with ``huggingface_hub.snapshot_download``:
   tokenizer and config files for a command that only tokenizes, the weights too for one that trains or serves.
   The snapshot lands in ``model.cache_dir`` (a directory every node mounts) or the driver's Hugging Face cache;
   with ``model.cache_dir`` on ``s3://``/``gs://`` it is uploaded there as well. ``model.commit`` and
   ``model.resolved_path`` then travel inside the config to every worker, trial and replica.
2. **Open** (:func:`local_model_dir`, wherever a process loads the model): the resolved snapshot itself; a
   snapshot on ``s3://``/``gs://`` is first copied into this node's Hugging Face cache; a snapshot path missing
   on this node (another node, no shared cache) is downloaded again at exactly its commit.

A local directory passes through unchanged and has no commit (hashing its weights on every command would cost
seconds per GB), except a directory inside a hub cache (``.../models--org--name/snapshots/<commit>``), whose
name is its commit. What cannot be had is one line (:class:`~aigc.errors.ModelUnavailableError`) before any
Ray work. The token is ``huggingface_hub``'s own (``HF_TOKEN``, or ``hf auth login``); nothing here records it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import uuid

import huggingface_hub
import pyarrow.fs as pafs
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from aigc import storage
from aigc.config.schema import ModelConfig
from aigc.errors import ConfigError, ModelUnavailableError

__all__ = ["hub_id_of", "is_hub_id", "local_model_dir", "resolve_model"]

logger = logging.getLogger(__name__)

# Enough to build the tokenizer and read the architecture: configs, vocabularies, chat templates.
_TOKENIZER_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
_CODE_FILES = ["*.py"]  # custom modelling code, used only with model.trust_remote_code
# The weights transformers loads, whole or sharded: safetensors, else PyTorch pickles when a repo has no
# safetensors. Other copies in a repo (original/*.pth, onnx/, gguf, consolidated.safetensors) are never fetched.
_WEIGHTS = {"model*.safetensors": "model.safetensors.index.json", "pytorch_model*.bin": "pytorch_model.bin.index.json"}
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+)/snapshots/([0-9a-f]{40})$")


def _snapshot_parts(path: str) -> tuple[str, str] | None:
    """``(hub id, commit)`` of a hub-cache snapshot path (local or URI), else None. Hub ids never hold ``--``."""
    m = _SNAPSHOT.search(path.replace(os.sep, "/").rstrip("/"))
    return (m.group(1).replace("--", "/"), m.group(2)) if m else None


def hub_id_of(path: str) -> str | None:
    """The hub id of a hub-cache snapshot path (``.../models--Qwen--Qwen2.5-0.5B/snapshots/<commit>``), else None:
    clients and the registry keep naming a resolved model by its hub id, never by its snapshot directory."""
    parts = _snapshot_parts(path)
    return parts[0] if parts else None


def is_hub_id(name_or_path: str) -> bool:
    """Whether ``model.name_or_path`` names a hub repository: not a URI, not an absolute path, no such directory."""
    return not (storage.is_uri(name_or_path) or os.path.isabs(name_or_path) or os.path.isdir(name_or_path))


# 1. on the driver
def resolve_model(model: ModelConfig, *, weights: bool) -> ModelConfig:
    """``model`` with ``commit`` and ``resolved_path`` set: what every process of this command loads.

    Calling it again is cheap: a resolved model is returned as it is, unless ``weights`` are now needed and
    its snapshot has only the tokenizer; those come at the same commit.

    Args:
        weights: the command loads the weights (train, sweep, serve, export); False = tokenizer and config only.

    Raises:
        ModelUnavailableError: a hub id offline and not cached, gated or private without a token, an unknown
            revision; or a directory without the files the command needs.
        ConfigError: ``model.revision`` given for a local directory.
    """
    name = model.name_or_path
    if not is_hub_id(name):
        if model.revision:
            raise ConfigError(
                f"model.revision: {model.revision!r} is for a hub id, but model.name_or_path {name} is a directory; "
                "drop model.revision"
            )
        if not storage.is_uri(name):
            _check_files(name, name, weights, "point model.name_or_path at a directory written by save_pretrained")
        parts = _snapshot_parts(name)
        return model.model_copy(update={"resolved_path": name, "commit": parts[1] if parts else None})
    revision = model.revision
    done = model.resolved_path is not None and model.commit is not None and hub_id_of(model.resolved_path) == name
    if done:
        if not storage.is_uri(model.resolved_path) and _missing(model.resolved_path, weights) is None:
            return model
        revision = model.commit  # the same commit, with what is still missing
    shared = model.cache_dir if model.cache_dir and storage.is_uri(model.cache_dir) else None
    path = _fetch(name, revision, None if shared else model.cache_dir, weights, model.trust_remote_code)
    commit = os.path.basename(path)
    if shared:
        path = _upload(path, shared, name, commit)
    if not done:  # once per command: what it runs on
        print(f"[model] {name}@{model.revision or 'main'} -> commit {commit} in {path}", flush=True)
    return model.model_copy(update={"commit": commit, "resolved_path": path})


def _fetch(repo_id: str, revision: str | None, cache: str | None, weights: bool, code: bool) -> str:
    """The local snapshot of ``repo_id`` at ``revision`` with the files the command needs (see the patterns)."""
    base = [*_TOKENIZER_FILES, *(_CODE_FILES if code else [])]
    safetensors, pickles = _WEIGHTS
    path = _snapshot(repo_id, revision, cache, [*base, safetensors] if weights else base)
    if weights and not _has_weights(path):  # a repo without safetensors: its PyTorch weights, same commit
        path = _snapshot(repo_id, os.path.basename(path), cache, [*base, pickles])
    hint = "run again with the hub reachable (HF_HUB_OFFLINE unset) to complete the cached copy"
    _check_files(path, f"{repo_id}@{os.path.basename(path)}", weights, hint)
    return path


def _snapshot(repo_id: str, revision: str | None, cache: str | None, patterns: list[str]) -> str:
    """``snapshot_download``, its errors as one line each."""
    offline = constants.is_offline_mode()
    shown = f"{repo_id}@{revision or 'main'}"
    endpoint = constants.ENDPOINT
    try:
        return huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache, allow_patterns=patterns, local_files_only=offline
        )
    except HFValidationError:
        raise ModelUnavailableError(
            f"model.name_or_path {repo_id!r} is neither a directory here nor a hub id (org/name)"
        ) from None
    except GatedRepoError:
        if huggingface_hub.get_token():
            raise ModelUnavailableError(
                f"{repo_id} is gated and the token in HF_TOKEN (or `hf auth login`) has no "
                f"access: accept its terms at {endpoint}/{repo_id}, then run again"
            ) from None
        raise ModelUnavailableError(
            f"{repo_id} is gated: accept its terms at {endpoint}/{repo_id}, then set HF_TOKEN to a token of that "
            "account (or run `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise ModelUnavailableError(
            f"model.revision {revision!r}: {repo_id} has no such branch, tag or commit on the hub at {endpoint}"
        ) from None
    except RepositoryNotFoundError:
        if huggingface_hub.get_token():
            access = "and the token in HF_TOKEN (or `hf auth login`) has no access to it"
        else:
            access = "and needs a token: set HF_TOKEN (or run `hf auth login`)"
        raise ModelUnavailableError(
            f"{repo_id}: no such model on the hub at {endpoint}, or it is private {access}"
        ) from None
    except IncompleteSnapshotError as exc:
        raise ModelUnavailableError(
            f"{shown}: the cached copy {exc.snapshot_path} is incomplete and {_reason(exc, offline)}; run again "
            "with the hub reachable (HF_HUB_OFFLINE unset) to complete it"
        ) from None
    except LocalEntryNotFoundError as exc:
        where = cache or constants.HF_HUB_CACHE
        raise ModelUnavailableError(
            f"{shown} is not in the Hugging Face cache {where} and {_reason(exc, offline)}: download it where the "
            f"hub is reachable (`hf download {repo_id}`), copy that cache here and run with HF_HUB_OFFLINE=1, or set "
            "model.name_or_path=/path/to/a/local/copy"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelUnavailableError(f"downloading {shown} failed: {_first_line(exc)}") from None


def _reason(exc: BaseException, offline: bool) -> str:
    """What was tried besides the cache, for the one-line error."""
    if offline:
        return "HF_HUB_OFFLINE=1 kept the hub out of it"
    cause = exc.__cause__ or exc
    return f"the hub at {constants.ENDPOINT} could not be reached ({type(cause).__name__}: {_first_line(cause)})"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _has_weights(path: str) -> bool:
    """Whether ``path`` holds loadable weights: a single file, or every shard its index names."""
    names = os.listdir(path) if os.path.isdir(path) else []
    for glob, index in _WEIGHTS.items():
        index_path = os.path.join(path, index)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                shards = set(json.load(f).get("weight_map", {}).values())
            if shards and all(os.path.isfile(os.path.join(path, s)) for s in shards):
                return True
        elif any(fnmatch.fnmatch(n, glob) and os.path.isfile(os.path.join(path, n)) for n in names):
            return True
    return False


def _missing(path: str, weights: bool) -> str | None:
    """What ``path`` lacks for a command that loads the tokenizer (and ``weights``), or None."""
    if not os.path.isdir(path):
        return "no such directory"
    if not any(os.path.isfile(os.path.join(path, m)) for m in _TOKENIZER_MARKERS):
        return f"no tokenizer ({', '.join(_TOKENIZER_MARKERS)})"
    if weights and not os.path.isfile(os.path.join(path, "config.json")):
        return "no config.json"
    if weights and not _has_weights(path):
        return f"no weights ({' or '.join(_WEIGHTS)}, or the shards their index names)"
    return None


def _check_files(path: str, shown: str, weights: bool, hint: str) -> None:
    problem = _missing(path, weights)
    if problem:
        where = "" if path == shown else f" ({path})"
        raise ModelUnavailableError(f"{shown}{where}: {problem}; {hint}")


# 2. shared storage
def _copy_file(src: str, dst: str) -> None:
    """One file between any two filesystems; a local destination appears whole (written aside, then renamed)."""
    sfs, sp = storage.filesystem(src)
    dfs, dp = storage.filesystem(dst)
    if storage.is_uri(dst):  # one object PUT: whole or absent
        pafs.copy_files(sp, dp, source_filesystem=sfs, destination_filesystem=dfs)
        return
    os.makedirs(os.path.dirname(dp), exist_ok=True)
    tmp = f"{dp}.tmp-{uuid.uuid4().hex}"
    pafs.copy_files(sp, tmp, source_filesystem=sfs, destination_filesystem=dfs)
    os.replace(tmp, dp)


def _upload(local: str, root: str, repo_id: str, commit: str) -> str:
    """Copy the snapshot's files that ``root`` (``s3://``/``gs://``) lacks to the same layout under it."""
    dest = storage.join(root, f"models--{repo_id.replace('/', '--')}", "snapshots", commit)
    have = {f[len(dest) :].lstrip("/") for f in storage.list_files(dest)}
    for top, _, files in os.walk(local, followlinks=True):
        for name in files:
            rel = os.path.relpath(os.path.join(top, name), local).replace(os.sep, "/")
            if rel not in have:
                _copy_file(os.path.join(top, name), storage.join(dest, rel))
    return dest


# 3. wherever the model is opened
def local_model_dir(path: str, *, weights: bool) -> str:
    """A local directory holding the model at ``path`` (what :meth:`ModelConfig.load_path` gives), for this process.

    - a directory here, or a hub id (an unresolved config, e.g. a library call): ``path`` as it is;
    - ``s3://``/``gs://``: its files copied into this node's Hugging Face cache (each renamed into place, so
      the processes of a node share one copy), unless already there;
    - a hub-cache snapshot that is not on this node (no shared ``model.cache_dir``): that exact commit,
      downloaded into this node's cache.

    Raises:
        ModelUnavailableError: a directory that is not on this node and not a hub snapshot; a failed download.
    """
    if storage.is_uri(path):
        return _copy_to_node(path)
    if os.path.isdir(path) or not os.path.isabs(path):
        return path
    parts = _snapshot_parts(path)
    if parts is None:
        raise ModelUnavailableError(
            f"{path} is not on node {socket.gethostname()}: put the base model where every node reads it "
            "(model.cache_dir on shared storage, or model.name_or_path on a shared filesystem or s3://)"
        )
    repo_id, commit = parts
    logger.warning(
        "%s is not on node %s: downloading %s@%s from the hub (set model.cache_dir to shared storage to copy it "
        "from there instead)",
        path,
        socket.gethostname(),
        repo_id,
        commit,
    )
    return _fetch(repo_id, commit, None, weights, code=True)


def _copy_to_node(uri: str) -> str:
    root = uri.rstrip("/")
    parts = _snapshot_parts(root)
    if parts:
        dest = os.path.join(constants.HF_HUB_CACHE, f"models--{parts[0].replace('/', '--')}", "snapshots", parts[1])
    else:  # a model directory on object storage: keep its name, which is the id clients see
        key = hashlib.sha256(root.encode()).hexdigest()[:16]
        dest = os.path.join(tempfile.gettempdir(), "aigc-models", key, root.rsplit("/", 1)[-1])
    files = storage.list_files(root)
    if not files:
        raise ModelUnavailableError(f"{uri} holds no files: resolve the model again on the driver")
    for f in files:
        target = os.path.join(dest, *f[len(root) :].lstrip("/").split("/"))
        if not os.path.isfile(target):
            _copy_file(f, target)
    return dest

"""Directories published whole: a reader of ``dest`` finds the previous tree or the new one, never a mix of both.

:func:`replace_dir` publishes a finished tree (an exported adapter or model) at ``dest``; :func:`is_complete` says
whether ``dest`` holds one. One publisher per ``dest`` at a time (the training run, the sweep, an export own theirs).

- **Local paths**: the tree is copied into a sibling ``.<name>.tmp-<id>``, flushed to disk, and renamed into
  place; the previous tree is renamed aside to ``.<name>.old-<id>`` just before and deleted after. A kill leaves the
  old tree or the new one at ``dest``, plus leftovers the next publish removes. A kill in the instant between the
  two renames leaves ``dest`` missing (not complete); the next publish renames the old tree back first.
- **Object stores** have no directory rename: the marker ``.<name>.complete`` beside ``dest`` is deleted first and
  written last, after every file. A tree without it (a publish killed part-way) is not complete; the previous
  tree is gone by then, but nothing takes the half-written one for a result. The marker sits beside the tree,
  not in it, so the tree holds exactly the exported files (what the registry copies and hashes).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid

from aigc.storage.files import (
    _fsync_dir,
    copy_dir,
    is_dir,
    is_file,
    is_uri,
    list_files,
    remove_tree,
    resolve,
    write_json,
)

__all__ = ["completion_marker", "is_complete", "replace_dir"]


def _split(path: str) -> tuple[str, str]:
    """``(parent, name)`` of a resolved local path or URI."""
    if is_uri(path):
        parent, _, name = path.rpartition("/")
        return parent, name
    return os.path.split(path)


def completion_marker(path: str) -> str:
    """The marker that a tree published at the URI ``path`` is whole: ``<parent>/.<name>.complete``."""
    parent, name = _split(resolve(path))
    return f"{parent}/.{name}.complete" if is_uri(path) else os.path.join(parent, f".{name}.complete")


def is_complete(path: str) -> bool:
    """Whether ``path`` holds a whole published tree: a local directory (only a rename puts one there), or a
    URI tree with its :func:`completion_marker`."""
    if is_uri(path):
        return is_file(completion_marker(path)) and is_dir(path)
    return os.path.isdir(path)


def replace_dir(src: str, dest: str) -> None:
    """Publish the tree at ``src`` (local or URI) as ``dest`` (local or URI), replacing what is there, whole or
    not at all (see the module docstring for what a kill leaves on each kind of storage)."""
    dest = resolve(dest)
    if is_uri(dest):
        marker = completion_marker(dest)
        remove_tree(marker)  # from here on dest does not count as published
        remove_tree(dest)
        copy_dir(src, dest)
        write_json(marker, {"files": len(list_files(dest)), "published_at": time.time()})
        return
    _replace_local(src, dest)


def _replace_local(src: str, dest: str) -> None:
    parent, name = os.path.split(dest)
    os.makedirs(parent, exist_ok=True)
    _recover(parent, name)
    token = uuid.uuid4().hex
    tmp, old = os.path.join(parent, f".{name}.tmp-{token}"), os.path.join(parent, f".{name}.old-{token}")
    moved = False
    try:
        # 1. the new tree beside dest, on disk before any rename (a power loss must not publish empty files)
        copy_dir(src, tmp)
        _fsync_tree(tmp)
        # 2. the old tree aside, the new one in: two renames within one directory
        if os.path.lexists(dest):
            os.rename(dest, old)
            moved = True
        os.rename(tmp, dest)
    except BaseException:
        if moved and not os.path.lexists(dest):
            os.rename(old, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    # 3. the old tree goes last: a kill here leaves a leftover for the next publish, never a missing dest
    if moved:
        shutil.rmtree(old, ignore_errors=True)


def _recover(parent: str, name: str) -> None:
    """Undo what a killed publish of ``name`` left in ``parent``: the previous tree renamed back when the kill fell
    between the two renames, then every ``.<name>.tmp-*`` and ``.<name>.old-*`` removed."""
    dest = os.path.join(parent, name)
    leftovers = [e for e in os.scandir(parent) if e.name.startswith((f".{name}.tmp-", f".{name}.old-"))]
    olds = sorted((e for e in leftovers if e.name.startswith(f".{name}.old-")), key=lambda e: e.stat().st_mtime)
    if olds and not os.path.lexists(dest):
        os.rename(olds[-1].path, dest)  # the tree that was at dest when the kill came
        leftovers = [e for e in leftovers if e.path != olds[-1].path]
    for entry in leftovers:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.remove(entry.path)


def _fsync_tree(root: str) -> None:
    """Flush every file under ``root``, then every directory, to disk."""
    for here, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(here, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(here)

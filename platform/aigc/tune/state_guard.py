"""A verified copy of Ray Tune's experiment state, so a driver killed while Tune writes it can still resume.

Ray Tune (2.60) rewrites its JSON state files in place (``experiment_state-<session>.json``, the searcher's
state: ``open(..., "w")`` and ``json.dump``, then a copy into the experiment directory). A driver SIGKILLed
during that write leaves a torn file; ``Tuner.restore`` then reads it, fails to parse it, and the re-run loses
the sweep's trials (seen once in a CI run of ``tests/test_sweep.py``'s kill test).

While a sweep runs, :class:`StateGuard` copies each state file that parses as JSON to ``<file>.good`` every
``period_s`` (an atomic, durable write). Before a restore, :func:`repair_state` puts a good copy back in place of a
state file that does not parse. The copy can be up to ``period_s`` older than the kill: a trial that finished in
that window is continued from its last checkpoint again (minutes), never lost. Local experiment directories only:
on an object store each upload replaces the object whole, so no torn file is ever read there.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import threading

from aigc import storage

__all__ = ["StateGuard", "repair_state"]

logger = logging.getLogger(__name__)

_PATTERNS = ("experiment_state-*.json", "*-state-*.json", "*_state-*.json")  # Tune's and its searchers' state
_GOOD = ".good"


def _state_files(exp_dir: str) -> list[str]:
    found = {p for pattern in _PATTERNS for p in glob.glob(os.path.join(exp_dir, pattern))}
    return sorted(p for p in found if not p.endswith(_GOOD))


def _parses(path: str) -> bytes | None:
    """The file's bytes when they are one whole JSON document, else None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        json.loads(data)
        return data
    except (OSError, ValueError):
        return None


def repair_state(exp_dir: str) -> list[str]:
    """Put the last good copy back in place of every state file of ``exp_dir`` that does not parse; returns the
    names repaired. A torn file without a good copy is left as it is (Tune reports it)."""
    if storage.is_uri(exp_dir) or not os.path.isdir(exp_dir):
        return []
    repaired = []
    for path in _state_files(exp_dir):
        if _parses(path) is not None:
            continue
        good = _parses(path + _GOOD)
        if good is None:
            logger.warning("Tune state file %s is torn and has no good copy", path)
            continue
        storage.write_bytes(path, good)
        repaired.append(os.path.basename(path))
    return repaired


class StateGuard:
    """Keeps ``<file>.good`` copies of ``exp_dir``'s state files while the ``with`` block runs (module doc)."""

    def __init__(self, exp_dir: str, period_s: float = 1.0):
        self._dir = exp_dir
        self._period = period_s
        self._stop = threading.Event()
        self._copied: dict[str, bytes] = {}
        self._thread: threading.Thread | None = None

    def copy_good(self) -> None:
        """One pass: copy each state file that parses and changed since the last pass."""
        for path in _state_files(self._dir):
            data = _parses(path)
            if data is not None and self._copied.get(path) != data:
                storage.write_bytes(path + _GOOD, data)
                self._copied[path] = data

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self.copy_good()
            except Exception:  # never let the copy thread end a sweep; the next pass tries again
                logger.exception("copying Tune's state files failed")

    def __enter__(self) -> StateGuard:
        if not storage.is_uri(self._dir):
            self._thread = threading.Thread(target=self._run, name="tune-state-guard", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

"""LoRA adapters loaded into one ``PeftModel`` by name, with deferred deletion of adapters still in use.

An adapter can be deleted (Serve's LRU eviction) while a request still needs it. Requests
:meth:`AdapterSet.acquire` it first; a delete only marks a busy adapter, and the engine removes it between
decoding steps once the last :meth:`AdapterSet.release` has happened. Loading and deleting take the model
lock, so they never overlap a forward pass.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any

from aigc.errors import AdapterLoadError

__all__ = ["BASE_ADAPTER", "AdapterSet", "check_adapter_dir"]

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # peft's reserved adapter name for "the base model, no adapter"
PLACEHOLDER = "aigc_placeholder"  # a zero LoRA that keeps the PeftModel valid when no adapter is loaded


class AdapterSet:
    """Which adapters the model holds, which requests use them, which are to be deleted."""

    def __init__(self, model: Any, model_lock: threading.Lock, wake: Any = None):
        self._model, self._model_lock, self._wake = model, model_lock, wake
        self._state_lock = threading.Lock()  # guards the bookkeeping; never held while the model runs
        self._loaded: set[str] = set()
        self._refs: dict[str, int] = {}
        self._doomed: set[str] = set()

    @property
    def names(self) -> list[str]:
        with self._state_lock:
            return sorted(self._loaded - self._doomed)

    def is_loaded(self, name: str) -> bool:
        with self._state_lock:
            return name == BASE_ADAPTER or name in self._loaded

    def load(self, path: str, name: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in (BASE_ADAPTER, PLACEHOLDER):
            raise ValueError(f"invalid adapter name {name!r}")
        check_adapter_dir(path)
        with self._model_lock:
            self.purge_locked()
            with self._state_lock:
                if name in self._loaded:
                    raise ValueError(f"adapter {name!r} is already loaded")
            try:
                self._model.load_adapter(path, adapter_name=name, is_trainable=False)
            except Exception as exc:
                raise AdapterLoadError(f"could not load adapter from {path}: {exc}") from exc
            self._model.eval()
            with self._state_lock:
                self._loaded.add(name)
                self._refs[name] = 0

    def delete(self, name: str) -> None:
        with self._state_lock:
            if name not in self._loaded:
                return
            self._doomed.add(name)
            free = self._refs.get(name, 0) == 0
        if free:
            with self._model_lock:
                self.purge_locked()

    def acquire(self, name: str) -> bool:
        with self._state_lock:
            if name not in self._loaded or name in self._doomed:
                return False
            self._refs[name] += 1
            return True

    def release(self, name: str) -> None:
        with self._state_lock:
            if self._refs.get(name, 0) > 0:
                self._refs[name] -= 1
        if self._model_lock.acquire(blocking=False):
            try:
                self.purge_locked()
            finally:
                self._model_lock.release()
        elif self._wake is not None:
            self._wake()  # a step is running: the engine thread purges right after it

    @property
    def pending(self) -> bool:
        """Whether a deleted adapter is free to be removed now."""
        with self._state_lock:
            return any(self._refs.get(n, 0) == 0 for n in self._doomed)

    def purge_locked(self) -> None:
        """Delete doomed adapters nobody uses any more (the caller holds the model lock)."""
        with self._state_lock:
            ready = [n for n in self._doomed if self._refs.get(n, 0) == 0]
        for name in ready:
            self._model.delete_adapter(name)
            with self._state_lock:
                self._doomed.discard(name)
                self._loaded.discard(name)
                self._refs.pop(name, None)
            logger.info("deleted adapter %s", name)


def check_adapter_dir(path: str) -> None:
    """Reject adapters mixed-adapter inference cannot run, with a message that says why."""
    cfg_file = Path(path) / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterLoadError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise AdapterLoadError(f"{cfg_file} is not valid JSON: {exc}") from exc
    if cfg.get("peft_type") != "LORA":
        raise AdapterLoadError(f"{path}: only LoRA adapters can be served, got peft_type={cfg.get('peft_type')}")
    if cfg.get("use_dora"):
        raise AdapterLoadError(f"{path}: DoRA adapters cannot be served per request (peft); merge it first")

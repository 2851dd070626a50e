"""LoRA adapters loaded into one ``PeftModel`` by name, with deferred deletion of adapters still in use.

An adapter can be deleted (Serve's LRU eviction) while a request still needs it. Requests
:meth:`AdapterSet.acquire` it first; a delete only marks a busy adapter, and the engine removes it between
decoding steps once the last :meth:`AdapterSet.release` has happened.

Loading reads the adapter's config and weights first, *without* the model lock (slow storage never pauses
the running batch), checks them (LoRA, finite weights), and only then takes the lock to inject the modules
and copy the weights in (peft's own ``add_adapter`` and ``set_peft_model_state_dict``, what
``PeftModel.load_adapter`` does). peft injects the modules before it copies the weights, so a load that fails
there deletes what it injected: a failed load leaves the model exactly as it was. If peft cannot delete an
adapter (injected or evicted), the model is in an unknown state and :attr:`AdapterSet.broken` says so; the
engine then reports itself unhealthy and Serve replaces the replica.

Every change to the model's adapters (a load, a failed load's clean-up, a delete) calls ``on_change`` under the
model lock, before the next forward: the engine's batched LoRA stacks (:mod:`aigc.serve.engine.lora_batch`)
are rebuilt from peft's modules then.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aigc.errors import AdapterLoadError

__all__ = ["BASE_ADAPTER", "AdapterSet", "check_adapter_dir", "read_adapter"]

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # peft's reserved adapter name for "the base model, no adapter"
PLACEHOLDER = "aigc_placeholder"  # a zero LoRA that keeps the PeftModel valid when no adapter is loaded


class AdapterSet:
    """Which adapters the model holds, which requests use them, which are to be deleted."""

    def __init__(
        self, model: Any, model_lock: threading.Lock, wake: Any = None, on_change: Callable[[], None] | None = None
    ):
        self._model, self._model_lock, self._wake = model, model_lock, wake
        self._on_change = on_change or (lambda: None)
        self._state_lock = threading.Lock()  # guards the bookkeeping; never held while the model runs
        self._loaded: set[str] = set()
        self._refs: dict[str, int] = {}
        self._doomed: set[str] = set()
        self.broken: str | None = None  # set when peft failed to remove an adapter: the model is not trustworthy

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
        config, weights = read_adapter(path, device=self._model.device)  # no lock: storage may be slow
        with self._model_lock:
            self.purge_locked()
            with self._state_lock:
                if name in self._loaded:
                    raise ValueError(f"adapter {name!r} is already loaded")
            try:
                self._inject_locked(name, config, weights)
            except Exception as exc:
                self._remove_injected_locked(name)
                raise AdapterLoadError(f"could not load adapter from {path}: {exc}") from exc
            finally:
                self._on_change()
            self._model.eval()
            with self._state_lock:
                self._loaded.add(name)
                self._refs[name] = 0

    def _inject_locked(self, name: str, config: Any, weights: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        self._model.add_adapter(name, config)
        result = set_peft_model_state_dict(self._model, weights, adapter_name=name)
        missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
        if missing:
            raise AdapterLoadError(f"the adapter's weights lack {len(missing)} tensors, e.g. {missing[0]}")

    def _remove_injected_locked(self, name: str) -> None:
        """Undo a failed load: delete whatever peft injected under ``name``."""
        if name not in self._model.peft_config:
            return
        try:
            self._model.delete_adapter(name)
        except Exception as exc:
            self.broken = f"peft could not remove the half-loaded adapter {name!r}: {exc!r}"
            logger.exception("failed to remove half-loaded adapter %s", name)

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
        """Delete doomed adapters nobody uses any more (the caller holds the model lock); never raises."""
        with self._state_lock:
            ready = [n for n in self._doomed if self._refs.get(n, 0) == 0]
        for name in ready:
            try:
                self._model.delete_adapter(name)
            except Exception as exc:  # the model may keep part of it: report, and stop retrying every step
                self.broken = f"peft could not delete adapter {name!r}: {exc!r}"
                logger.exception("failed to delete adapter %s", name)
            else:
                logger.info("deleted adapter %s", name)
            finally:
                self._on_change()
            with self._state_lock:
                self._doomed.discard(name)
                self._loaded.discard(name)
                self._refs.pop(name, None)


def read_adapter(path: str, device: Any = "cpu") -> tuple[Any, dict[str, Any]]:
    """A LoRA adapter directory's config and weights, read and checked without touching any model.

    Raises:
        AdapterLoadError: not a LoRA adapter this engine can serve, unreadable, or weights that are not finite.
    """
    import torch
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    check_adapter_dir(path)
    try:
        config = LoraConfig.from_pretrained(path)
        weights = load_peft_weights(path, device=str(device))
    except Exception as exc:
        raise AdapterLoadError(f"could not read adapter from {path}: {exc}") from exc
    config.inference_mode = True
    bad = next((k for k, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise AdapterLoadError(f"adapter {path}: tensor {bad} holds non-finite values (nan or inf)")
    return config, weights


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

"""A generator replica's side of runtime adapters (``POST``/``DELETE /v1/adapters``, :mod:`aigc.registry.runtime`).

A runtime adapter is loaded like a registered version, through Serve's multiplexed cache, on first use. What is
particular is that it can be taken away: every ``period_s`` the replica re-reads the record of each runtime
adapter it holds, and one whose record was deleted or replaced (loaded again from another path) is unloaded
from the engine at once (a request decoding on it finishes first: the engine defers the removal) and marked
stale. Serve's cache keeps the stale entry until it evicts it; the next request for the name loads whatever the
record says then, or gets 404 when there is none (:meth:`aigc.serve.generator.Generator`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aigc.registry.runtime import RuntimeAdapters

__all__ = ["RuntimeTracker"]

logger = logging.getLogger("ray.serve")

SWEEP_PERIOD_S = 2.0


class RuntimeTracker:
    """The runtime adapters one replica holds, each with the record stamp it was loaded from."""

    def __init__(self, records: RuntimeAdapters, period_s: float = SWEEP_PERIOD_S):
        self._records, self._period = records, period_s
        self._held: dict[str, Any] = {}  # model id -> LoadedAdapter (with .loaded_at, the record's stamp)

    def track(self, adapter: Any) -> None:
        self._held[adapter.model_id] = adapter

    @property
    def held(self) -> list[str]:
        return sorted(self._held)

    async def sweep(self) -> list[str]:
        """Unload every held adapter whose record is gone or replaced; returns their names."""
        dropped = []
        for model_id, adapter in list(self._held.items()):
            record = await asyncio.to_thread(self._records.get, model_id)
            if record is not None and record.created_at == adapter.loaded_at:
                continue
            self._held.pop(model_id, None)
            adapter.stale = True
            await asyncio.to_thread(adapter.unload)
            why = "deleted" if record is None else "replaced"
            logger.info("runtime adapter %s was %s: unloaded %s", model_id, why, adapter.name)
            dropped.append(model_id)
        return dropped

    async def keep_sweeping(self) -> None:
        """:meth:`sweep` every ``period_s``, forever (run it as a task)."""
        while True:
            await asyncio.sleep(self._period)
            try:
                await self.sweep()
            except Exception:  # an unreadable store: held adapters keep serving; tried again next period
                logger.exception("checking runtime adapters failed")

"""Model ids resolved against the registry at request time, reused for a short while.

Aliases move while the app runs (``aigc promote``), so the ingress resolves ``support-bot`` or
``support-bot:stable`` per request, never at deploy time. Each outcome (the version, or "no such model") is
kept for ``ttl_s`` seconds: the registry (perhaps an object store) is read at most once per id per period
instead of once per request, and a moved alias reaches traffic within ``ttl_s``. The listing behind
``/v1/models`` is kept the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aigc.errors import RegistryError
from aigc.registry import AdapterVersion, Alias, Registry

__all__ = ["Listing", "ModelResolver"]

_MAX_CACHED = 4096  # ids remembered at once; unknown ids from clients cannot grow the cache beyond this


@dataclass(frozen=True)
class Listing:
    """Every published version (ascending) and every alias that is set, read together."""

    versions: list[AdapterVersion]
    aliases: list[Alias]


class ModelResolver:
    """``model`` id -> registry version, each answer reused for ``ttl_s`` seconds.

    Args:
        registry: the registry to read.
        ttl_s: how long an answer is reused (0 = read the registry on every call).
        clock: a monotonic clock (tests pass a fake one).
    """

    def __init__(self, registry: Registry, ttl_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self._registry, self._ttl, self._clock = registry, ttl_s, clock
        self._cache: OrderedDict[str, tuple[float, AdapterVersion | str]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[tuple[float, AdapterVersion | str]]] = {}
        self._listing: tuple[float, Listing] | None = None

    async def resolve(self, model_id: str) -> AdapterVersion:
        """The version ``model_id`` names now (at most ``ttl_s`` old).

        Raises:
            RegistryError: the id is malformed or names nothing registered (also remembered for ``ttl_s``).
        """
        hit = self._cache.get(model_id)
        if hit is None or self._clock() >= hit[0]:
            # One registry read per id at a time: concurrent misses share it, so a read that began before a
            # move can never overwrite the answer of one that began after it.
            pending = self._pending.get(model_id)
            if pending is None:
                pending = asyncio.ensure_future(self._read(model_id))
                self._pending[model_id] = pending
                pending.add_done_callback(lambda _: self._pending.pop(model_id, None))
            hit = await asyncio.shield(pending)
        if isinstance(hit[1], str):
            raise RegistryError(hit[1])
        return hit[1]

    async def _read(self, model_id: str) -> tuple[float, AdapterVersion | str]:
        try:
            value: AdapterVersion | str = await asyncio.to_thread(self._registry.resolve, model_id)
        except RegistryError as exc:
            value = exc.message  # a fresh error per raise: a kept exception would grow its traceback
        hit = (self._clock() + self._ttl, value)
        self._cache[model_id] = hit
        self._cache.move_to_end(model_id)
        while len(self._cache) > _MAX_CACHED:
            self._cache.popitem(last=False)
        return hit

    async def listing(self) -> Listing:
        """Every version and alias (at most ``ttl_s`` old)."""
        if self._listing is None or self._clock() >= self._listing[0]:

            def read() -> Listing:
                return Listing(self._registry.list(), self._registry.aliases())

            value = await asyncio.to_thread(read)
            self._listing = (self._clock() + self._ttl, value)
        return self._listing[1]

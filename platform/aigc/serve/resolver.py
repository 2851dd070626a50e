"""Model ids resolved against the registry at request time, reused for a short while.

Aliases move while the app runs (``aigc promote``), so the ingress resolves ``support-bot`` or
``support-bot:stable`` per request, never at deploy time. Each outcome (the version, or "no such model") is
kept for ``ttl_s`` seconds: the registry (perhaps an object store) is read at most once per id per period
instead of once per request, and a moved alias reaches traffic within ``ttl_s``. The listing behind
``/v1/models`` is kept the same way.

When the registry cannot be read (an object-store outage: pyarrow raises ``OSError``), the last answer for an
id keeps being used, however old (stale-while-error; logged once per outage), so models already in use keep
serving. An id this replica never resolved is answered from the last listing (:meth:`ModelResolver.keep_listing`
refreshes it every ``LISTING_REFRESH_S`` in the background, so every replica of the ingress has one, not only
those that happened to receive a request for the id); an id missing from it too raises
:class:`~aigc.errors.ServiceUnavailableError` (503). An alias moved in the last ``LISTING_REFRESH_S`` before the
outage is therefore seen at its previous version by replicas that never resolved it (the store is down, so
nothing moves during the outage itself).

An alias split between versions (``aigc traffic support-bot v3=90 v4=10``) is resolved to all of them and each
request picks one by weight: the same ``user`` (or, without one, the same API key) always lands on the same
version while the weights stay (a hash of the id and the sticky key), a request with neither is drawn at random.
The answer's ``model`` names the version that answered, so captured feedback records it. During an outage a
replica that never resolved the alias serves the listing's primary version only.

:func:`check_servable` says whether this server can serve a registered version at all: LoRA adapters trained on
its base model only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aigc.errors import InvalidRequestError, RegistryError, ServiceUnavailableError
from aigc.models.loading import model_id_for
from aigc.registry import AdapterVersion, Alias, Registry
from aigc.registry.aliases import DEFAULT_ALIAS, LATEST
from aigc.registry.runtime import ServedModels

__all__ = ["Listing", "ModelResolver", "Split", "check_servable", "pick", "servable"]

logger = logging.getLogger("ray.serve")

_MAX_CACHED = 4096  # ids remembered at once; unknown ids from clients cannot grow the cache beyond this
LISTING_REFRESH_S = 30.0  # how often each replica re-reads the listing in the background (new versions only)


@dataclass(frozen=True)
class Listing:
    """Every published version (ascending) and every alias that is set, read together."""

    versions: list[AdapterVersion]
    aliases: list[Alias]

    def find(self, model_id: str) -> AdapterVersion | None:
        """The version ``model_id`` named when this listing was read, by the rules of
        :meth:`aigc.registry.Registry.resolve`; None when it named nothing listed."""
        by_id = {e.model_id: e for e in self.versions}
        if model_id in by_id:  # name:vN
            return by_id[model_id]
        name, _, ref = model_id.partition(":")
        if ref != LATEST:
            alias = ref or DEFAULT_ALIAS
            for a in self.aliases:
                if a.name == name and a.alias == alias:
                    return by_id.get(a.target)
            if ref:
                return None
        same_name = [e for e in self.versions if e.name == name]  # ascending: the last is the latest
        return same_name[-1] if same_name else None


def check_servable(entry: AdapterVersion, base_model: str) -> None:
    """Refuse a version this server cannot serve, naming why.

    Args:
        entry: the registry version a request resolved to.
        base_model: the id of the base model this server runs (:func:`aigc.models.loading.model_id_for`).

    Raises:
        InvalidRequestError: a full fine-tune (a whole model, not an adapter), or an adapter trained on another
            base model (its LoRA weights would be applied to the wrong weights, silently).
    """
    if entry.kind != "lora":
        raise InvalidRequestError(
            f"the model '{entry.model_id}' is a full fine-tune, not an adapter of {base_model}: serve it as a base "
            "model of its own (model.name_or_path = that version's directory)",
            param="model",
            code="model_not_servable",
        )
    trained_on = model_id_for(entry.base_model)
    if trained_on != base_model:
        raise InvalidRequestError(
            f"the model '{entry.model_id}' was trained on base model '{trained_on}', and this server serves "
            f"'{base_model}'; serve it from a server whose base model is '{trained_on}'",
            param="model",
            code="model_base_mismatch",
        )


def servable(entry: AdapterVersion, base_model: str) -> bool:
    """Whether :func:`check_servable` accepts ``entry`` (what ``/v1/models`` lists)."""
    try:
        check_servable(entry, base_model)
    except InvalidRequestError:
        return False
    return True


Split = list[tuple[AdapterVersion, int]]  # (version, weight): one entry unless an alias splits its traffic


def pick(split: Split, model_id: str, sticky: str | None = None) -> AdapterVersion:
    """The version of ``split`` a request gets: by weight; the same for the same ``sticky`` key and weights."""
    if len(split) == 1:
        return split[0][0]
    total = sum(w for _, w in split)
    if sticky:
        digest = hashlib.sha256(f"{model_id}\0{sticky}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") % total
    else:
        point = random.randrange(total)
    for entry, weight in split:
        if point < weight:
            return entry
        point -= weight
    return split[-1][0]


class ModelResolver:
    """``model`` id -> registry version, each answer reused for ``ttl_s`` seconds.

    Args:
        registry: the registry to read.
        ttl_s: how long an answer is reused (0 = read the registry on every call).
        clock: a monotonic clock (tests pass a fake one).
    """

    def __init__(
        self, registry: Registry | ServedModels, ttl_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ):
        self._registry, self._ttl, self._clock = registry, ttl_s, clock
        self._cache: OrderedDict[str, tuple[float, Split | str]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[tuple[float, Split | str]]] = {}
        self._listing: tuple[float, Listing] | None = None
        self._outage = False  # the registry failed to read: stale answers are in use (logged once)

    async def resolve(self, model_id: str, sticky: str | None = None) -> AdapterVersion:
        """The version ``model_id`` names now (at most ``ttl_s`` old); for a split alias, the version this request
        gets: by weight, the same one for the same ``sticky`` key (the request's ``user`` or API key name).

        Raises:
            RegistryError: the id is malformed or names nothing registered (also remembered for ``ttl_s``).
            ServiceUnavailableError: the registry cannot be read and this id was never resolved before.
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
        return pick(hit[1], model_id, sticky)

    def forget(self, model_id: str) -> None:
        """Drop the remembered answer for ``model_id`` and the listing (an adapter loaded or unloaded here)."""
        self._cache.pop(model_id, None)
        self._listing = None if self._listing is None else (0.0, self._listing[1])

    async def _read(self, model_id: str) -> tuple[float, Split | str]:
        try:
            value: Split | str = await asyncio.to_thread(self._registry.resolve_split, model_id)
        except RegistryError as exc:
            value = exc.message  # a fresh error per raise: a kept exception would grow its traceback
        except OSError as exc:
            stale = self._cache.get(model_id)
            self._note_outage(exc)
            listed = self._listed(model_id)
            value = stale[1] if stale is not None else [(listed, 1)] if listed is not None else None
            if value is None:
                raise _unavailable() from None
            hit = (self._clock() + self._ttl, value)  # stale-while-error: try the registry again after ttl_s
            self._cache[model_id] = hit
            return hit
        self._note_recovery()
        hit = (self._clock() + self._ttl, value)
        self._cache[model_id] = hit
        self._cache.move_to_end(model_id)
        while len(self._cache) > _MAX_CACHED:
            self._cache.popitem(last=False)
        return hit

    async def listing(self) -> Listing:
        """Every version and alias (at most ``ttl_s`` old; the last one read while the registry is unreachable).

        Raises:
            ServiceUnavailableError: the registry cannot be read and was never listed before.
        """
        if self._listing is None or self._clock() >= self._listing[0]:
            known = {e.model_id: e for e in self._listing[1].versions} if self._listing else None

            def read() -> Listing:
                return Listing(self._registry.list(known), self._registry.aliases())

            try:
                value = await asyncio.to_thread(read)
            except OSError as exc:
                self._note_outage(exc)
                if self._listing is None:
                    raise _unavailable() from None
                value = self._listing[1]
            else:
                self._note_recovery()
            self._listing = (self._clock() + self._ttl, value)
        return self._listing[1]

    async def keep_listing(self, period_s: float = LISTING_REFRESH_S) -> None:
        """Read the listing now and every ``period_s`` seconds, forever (run it as a task; cancel to stop), so
        that during an outage this replica can still resolve ids it never saw (see the module docstring)."""
        while True:
            try:
                await self.listing()
            except ServiceUnavailableError:
                pass  # the registry is unreachable and was never listed: logged once by _note_outage
            except Exception:  # never let the refresh task die on a surprise; it is retried next period
                logger.exception("reading the model listing failed")
            await asyncio.sleep(period_s)

    def _listed(self, model_id: str) -> AdapterVersion | None:
        """What the last listing says ``model_id`` named (None: never listed, or not in it)."""
        return self._listing[1].find(model_id) if self._listing is not None else None

    def _note_outage(self, exc: BaseException) -> None:
        if not self._outage:
            self._outage = True
            logger.warning("model registry unreadable, serving what was resolved before: %s", exc)

    def _note_recovery(self) -> None:
        if self._outage:
            self._outage = False
            logger.warning("model registry readable again")


def _unavailable() -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "the model registry is unreachable and this model was not in use yet; retry shortly",
        code="registry_unavailable",
    )

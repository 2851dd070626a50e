"""Per-key limits across ingress replicas: one counter actor on the cluster, a local fallback in each replica.

Every ingress replica of an app asks the same named Ray actor (``aigc-limits-<app>`` in namespace ``aigc``,
detached, no CPU, restarted if it dies) to admit each request of a key with limits, so a key's limits hold for
the endpoint as a whole, however many ingress replicas serve it. The counting itself is
:class:`aigc.serve.limits.KeyCounters`.

**When the actor cannot be reached** (it does not answer within ``timeout_s``, or it is being restarted), the
replica **fails open onto its own local limiter**: the same limits, counted by this replica alone, for
``retry_s`` seconds before it asks the actor again. Why open: the counter is bookkeeping, and its loss must not
turn into an outage for every tenant; the local limiter still holds each key to its limits per replica (so at
most ``ingress_replicas`` times a limit while the actor is away). Each request decided locally increments
``ray_aigc_limiter_fallback_total`` and the first of each outage logs a warning, for an alert.

Keys without limits are not asked about: their usage is recorded without waiting (for ``aigc keys usage``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import ray

from aigc.errors import AigcError
from aigc.serve.api_errors import RateLimitedError
from aigc.serve.keys import KeyPolicy
from aigc.serve.limits import KeyCounters
from aigc.serve.metrics import ingress_metrics

__all__ = ["ACTOR_NAMESPACE", "Admission", "Quota", "actor_name", "cluster_usage"]

logger = logging.getLogger("ray.serve")
ACTOR_NAMESPACE = "aigc"
_RELEASE_WAIT_S = 1.0


def actor_name(app_name: str) -> str:
    return f"aigc-limits-{app_name}"


@ray.remote(num_cpus=0, max_restarts=-1)
class _CounterActor(KeyCounters):
    """The cluster's one counter per app (a restart starts from empty windows)."""


def _get_or_create(app_name: str) -> Any:
    return _CounterActor.options(name=actor_name(app_name), namespace=ACTOR_NAMESPACE, get_if_exists=True,
                                 lifetime="detached").remote()  # fmt: skip


class Admission:
    """One admitted request: its rate-limit headers and the counting still to do when it ends."""

    def __init__(self, key: str | None, counter: Any, lease: str | None, headers: dict[str, str], limited: bool):
        self.key, self.headers = key, headers
        self._counter, self._lease, self._limited = counter, lease, limited
        self._prompt_counted, self._done = 0, False

    def _tell(self, method: str, *args: Any) -> Any:
        """Send the counter ``method`` (an actor call, or the local counter); returns what to await, if any."""
        fn = getattr(self._counter, method)
        return fn.remote(*args) if hasattr(fn, "remote") else fn(*args)

    def _call(self, method: str, *args: Any) -> None:
        """Tell the counter without waiting; a failure only logs (the counts are then short by this call)."""
        if self._counter is None:
            return
        try:
            self._tell(method, *args)
        except Exception as exc:
            logger.warning("the rate-limit counter missed a %s for key %s: %s", method, self.key, type(exc).__name__)

    def count_prompt(self, prompt_tokens: int) -> None:
        """Count the prompt once the generator has admitted the request (a stream's first chunk)."""
        if self._limited and not self._prompt_counted and prompt_tokens > 0:
            self._prompt_counted = prompt_tokens
            self._call("add_tokens", self.key, prompt_tokens)

    async def finish(self, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """The request ended: count its tokens (and its usage metric), free its concurrency slot. Idempotent.

        A limited key's release is awaited (briefly), so the key's next request, on whichever replica, sees it.
        """
        if self._done or self.key is None:
            return
        self._done = True
        tokens = max(0, prompt_tokens - self._prompt_counted) + completion_tokens
        if prompt_tokens or completion_tokens:
            ingress_metrics().key_usage(self.key, prompt_tokens, completion_tokens)
        if not self._limited:
            return self._call("record", self.key, tokens)
        try:
            pending = self._tell("release", self.key, self._lease, tokens)
            if pending is not None:
                await asyncio.wait_for(pending, _RELEASE_WAIT_S)
        except Exception as exc:  # the lease expires on its own; the tokens are not counted
            logger.warning("the rate-limit counter missed a release for key %s: %s", self.key, type(exc).__name__)


class Quota:
    """One ingress replica's door to the per-key limits.

    Args:
        app_name: the Serve app (one counter actor per app).
        lease_s: how long an admitted request may hold a concurrency slot (the request deadline and a margin).
        timeout_s: how long to wait for the counter actor before deciding locally.
        retry_s: after a failure, how long to decide locally before asking the actor again.
        counter_factory: makes the actor handle (tests pass a stand-in); default: get or create the named actor.
        clock: monotonic seconds, for ``retry_s``.
    """

    def __init__(self, app_name: str, lease_s: float, timeout_s: float = 2.0, retry_s: float = 5.0,
                 counter_factory: Callable[[], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self._factory = counter_factory or (lambda: _get_or_create(app_name))
        self._lease_s, self._timeout_s, self._retry_s, self._clock = lease_s, timeout_s, retry_s, clock
        self._actor: Any = None
        self._down_until = 0.0
        self.local = KeyCounters()

    def _failed(self, exc: BaseException) -> None:
        logger.warning("the rate-limit counter is unreachable (%s); limits are counted per ingress replica "
                       "for the next %gs", type(exc).__name__, self._retry_s)  # fmt: skip
        self._actor, self._down_until = None, self._clock() + self._retry_s

    async def _counter(self) -> Any:
        """The actor handle, or None while it is (recently found) unreachable."""
        if self._actor is None and self._clock() >= self._down_until:
            try:
                self._actor = await asyncio.wait_for(asyncio.to_thread(self._factory), self._timeout_s)
            except Exception as exc:
                self._failed(exc)
        return self._actor

    async def _ask_actor(self, *args: Any) -> dict[str, Any] | None:
        """The actor's decision, or None (and fallback mode for ``retry_s``) when it cannot be reached."""
        actor = await self._counter()
        if actor is None:
            return None
        try:
            return await asyncio.wait_for(actor.acquire.remote(*args), self._timeout_s)
        except Exception as exc:  # dead, restarting, timed out: decide here for a while
            self._failed(exc)
            return None

    async def admit(self, key: str | None, policy: KeyPolicy) -> Admission:
        """Admit a request of the key named ``key`` (None: the endpoint has no keys) under ``policy``.

        Raises:
            RateLimitedError: 429 ``rate_limit_exceeded`` with ``Retry-After`` and the ``x-ratelimit-*`` headers.
        """
        if key is None:
            return Admission(None, None, None, {}, limited=False)
        if not policy.limited:
            return Admission(key, await self._counter() or self.local, None, {}, limited=False)
        args = (key, policy.rpm, policy.tpm, policy.concurrency, self._lease_s)
        decision = await self._ask_actor(*args)
        counter: Any = self._actor
        if decision is None:
            ingress_metrics().limiter_fallback()
            decision, counter = self.local.acquire(*args), self.local
        if not decision["allowed"]:
            ingress_metrics().rate_limited(key, decision["type"])
            raise RateLimitedError(decision["message"], decision["retry_after_s"], type=decision["type"],
                                   headers=decision["headers"])  # fmt: skip
        return Admission(key, counter, decision["lease"], decision["headers"], limited=True)


def cluster_usage(app_name: str, address: str | None = None) -> dict[str, dict[str, int]]:
    """Each key's usage from the app's counter actor (what ``aigc keys usage`` prints).

    Raises:
        AigcError: no Ray cluster, or no counter for this app (no request of a key has reached it yet).
    """
    if not ray.is_initialized():
        try:
            ray.init(address=address or "auto", log_to_driver=False)
        except ConnectionError:
            raise AigcError("no running Ray cluster found: set RAY_ADDRESS (or --address) to the cluster that "
                            "serves the endpoint") from None  # fmt: skip
    try:
        actor = ray.get_actor(actor_name(app_name), namespace=ACTOR_NAMESPACE)
    except ValueError:
        raise AigcError(f"no usage counter for app {app_name!r} on this cluster: it starts with the first request "
                        "of a key (serve.app_name names the app)") from None  # fmt: skip
    return ray.get(actor.usage.remote(), timeout=30)

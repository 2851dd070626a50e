"""Per-key request, token and concurrency limits: sliding one-minute windows, and OpenAI's rate-limit headers.

:class:`KeyCounters` is plain Python: the cluster's counter actor holds one (:mod:`aigc.serve.quota`), and each
ingress replica holds another as its fallback when the actor cannot be reached.

Per key, within the last :data:`WINDOW_S` seconds:

- **requests** (``rpm``): a request is admitted while fewer than ``rpm`` were admitted in the window;
- **tokens** (``tpm``): while the prompt and completion tokens counted in the window are below ``tpm``. A
  request's tokens are known only once the generator has them (prompt on admission to a batch, completion at
  the end), so the request that crosses the limit is served and the next ones wait;
- **concurrency**: requests admitted and not yet finished. Each holds a lease that expires after ``lease_s``
  (a replica that died mid-request cannot hold a slot forever).

A refusal says which limit (``requests`` or ``tokens``, concurrency being ``requests``), when to retry, and the
headers OpenAI sends (``x-ratelimit-limit-requests``, ``-remaining-``, ``-reset-`` and the same for tokens;
durations as ``1s``, ``6m0s``, ``250ms``).
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["WINDOW_S", "KeyCounters", "duration", "rate_headers"]

WINDOW_S = 60.0


def duration(seconds: float) -> str:
    """OpenAI's duration format: ``250ms``, ``1s``, ``1.5s``, ``6m0s``."""
    seconds = round(max(0.0, seconds), 3)  # milliseconds: 59.9996 is a minute, not "60s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{text}s" if minutes else f"{text}s"


@dataclass
class _Window:
    requests: deque[float] = field(default_factory=deque)  # admission times
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens)
    leases: dict[str, float] = field(default_factory=dict)  # lease id -> expiry
    requests_total: int = 0
    tokens_total: int = 0

    def prune(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.tokens.popleft()
        for lease, expiry in list(self.leases.items()):
            if expiry <= now:
                del self.leases[lease]

    def used_tokens(self) -> int:
        return sum(n for _, n in self.tokens)


def rate_headers(w: _Window, rpm: int | None, tpm: int | None, now: float) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the limits a key has (none for a limit it has not).

    ``reset-*`` is the time until the window is back to its initial state (every counted entry expired).
    """
    out: dict[str, str] = {}
    if rpm is not None:
        out["x-ratelimit-limit-requests"] = str(rpm)
        out["x-ratelimit-remaining-requests"] = str(max(0, rpm - len(w.requests)))
        out["x-ratelimit-reset-requests"] = duration(w.requests[-1] + WINDOW_S - now if w.requests else 0)
    if tpm is not None:
        out["x-ratelimit-limit-tokens"] = str(tpm)
        out["x-ratelimit-remaining-tokens"] = str(max(0, tpm - w.used_tokens()))
        out["x-ratelimit-reset-tokens"] = duration(w.tokens[-1][0] + WINDOW_S - now if w.tokens else 0)
    return out


class KeyCounters:
    """Sliding one-minute windows and open leases per key name (see the module doc).

    Every method takes and returns plain values, so the same object works in-process and inside a Ray actor.

    Args:
        clock: wall-clock seconds (every ingress replica compares against the same actor's clock).
    """

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._keys: dict[str, _Window] = {}

    def _window(self, key: str, now: float) -> _Window:
        w = self._keys.setdefault(key, _Window())
        w.prune(now)
        return w

    def acquire(self, key: str, rpm: int | None, tpm: int | None, concurrency: int | None,
                lease_s: float) -> dict[str, Any]:  # fmt: skip
        """Admit one request of ``key`` under its limits, or say which limit refuses it.

        Returns:
            ``{"allowed": True, "lease": id | None, "headers": {...}}`` or ``{"allowed": False, "type":
            "requests"|"tokens", "message": ..., "retry_after_s": float, "headers": {...}}``.
        """
        now = self._clock()
        w = self._window(key, now)
        refusal = None
        if concurrency is not None and len(w.leases) >= concurrency:
            refusal = ("requests", f"Rate limit reached for concurrent requests: limit {concurrency}, in progress "
                       f"{len(w.leases)}. Retry when one of them has finished.", 1.0)  # fmt: skip
        elif rpm is not None and len(w.requests) >= rpm:
            retry = w.requests[len(w.requests) - rpm] + WINDOW_S - now
            refusal = ("requests", f"Rate limit reached for requests per minute (RPM): limit {rpm}, used "
                       f"{len(w.requests)}. Please try again in {duration(retry)}.", retry)  # fmt: skip
        elif tpm is not None and w.used_tokens() >= tpm:
            used, retry = w.used_tokens(), 0.0
            for t, n in w.tokens:  # when enough old entries have left the window to go below the limit
                used -= n
                retry = t + WINDOW_S - now
                if used < tpm:
                    break
            refusal = ("tokens", f"Rate limit reached for tokens per minute (TPM): limit {tpm}, used "
                       f"{w.used_tokens()}. Please try again in {duration(retry)}.", retry)  # fmt: skip
        if refusal is not None:
            kind, message, retry = refusal
            return {"allowed": False, "type": kind, "message": message, "retry_after_s": max(retry, 0.0),
                    "headers": rate_headers(w, rpm, tpm, now)}  # fmt: skip
        w.requests.append(now)
        w.requests_total += 1
        lease = None
        if concurrency is not None:
            lease = uuid.uuid4().hex
            w.leases[lease] = now + lease_s
        return {"allowed": True, "lease": lease, "headers": rate_headers(w, rpm, tpm, now)}

    def add_tokens(self, key: str, tokens: int) -> None:
        """Count ``tokens`` of ``key`` now (a prompt once admitted, a completion once done)."""
        if tokens > 0:
            now = self._clock()
            w = self._window(key, now)
            w.tokens.append((now, tokens))
            w.tokens_total += tokens

    def record(self, key: str, tokens: int) -> None:
        """Count a request of a key without limits (for usage only) and its tokens."""
        now = self._clock()
        w = self._window(key, now)
        w.requests.append(now)
        w.requests_total += 1
        self.add_tokens(key, tokens)

    def release(self, key: str, lease: str | None, tokens: int = 0) -> None:
        """End a request: free its concurrency slot and count its last ``tokens``."""
        self.add_tokens(key, tokens)
        w = self._keys.get(key)
        if w is not None and lease is not None:
            w.leases.pop(lease, None)

    def usage(self) -> dict[str, dict[str, int]]:
        """Per key: requests and tokens in the last minute, requests in flight, totals since this counter began."""
        now = self._clock()
        out = {}
        for key in list(self._keys):
            w = self._window(key, now)
            out[key] = {"requests_1m": len(w.requests), "tokens_1m": w.used_tokens(), "in_flight": len(w.leases),
                        "requests_total": w.requests_total, "tokens_total": w.tokens_total}  # fmt: skip
        return out

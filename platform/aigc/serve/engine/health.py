"""Whether the engine is alive: making progress, not failing every step, its model trustworthy.

Serve replaces a replica whose ``check_health`` raises. The engine thread reports here after each forward
pass; :meth:`Liveness.problem` turns that into a reason the replica is unhealthy, or None:

1. the engine thread has died;
2. a forward pass has been running for ``stall_timeout_s``, or work is waiting (rows decoding or requests
   queued) and no pass finished for that long: a hung device, or the model lock held by something stuck;
3. ``max_failed_passes`` forward passes failed in a row with no success between them: a broken device or a
   poisoned model fails everything it is given, and looping on it would fail every request forever;
4. something marked the model untrustworthy (:meth:`Liveness.mark_fatal`, e.g. peft failed to remove an
   adapter).

Row-level failures (one request's sampling, detokenizer or adapter) never count: a hostile request must not
be able to take a replica down.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["Liveness"]


class Liveness:
    """Progress and failure bookkeeping of one engine thread (written by it, read by health checks).

    Args:
        stall_timeout_s: the longest a pass may take while work waits before the engine counts as wedged.
        max_failed_passes: consecutive failed forward passes that make the engine unhealthy.
        clock: a monotonic clock (tests pass a fake one).
    """

    def __init__(
        self, stall_timeout_s: float = 30.0, max_failed_passes: int = 3, clock: Callable[[], float] = time.monotonic
    ):
        self.stall_timeout_s, self.max_failed_passes, self._clock = stall_timeout_s, max_failed_passes, clock
        self._lock = threading.Lock()
        self._last_progress = clock()
        self._failed_in_a_row = 0
        self._last_failure = ""
        self._fatal: str | None = None
        self._pass_started: float | None = None

    def begin(self) -> None:
        """A forward pass starts."""
        with self._lock:
            self._pass_started = self._clock()

    def idle(self) -> None:
        """Nothing to do: the stall clock starts again when work arrives."""
        with self._lock:
            self._last_progress = self._clock()

    def passed(self) -> None:
        """A forward pass finished."""
        with self._lock:
            self._last_progress = self._clock()
            self._pass_started = None
            self._failed_in_a_row = 0

    def failed(self, exc: BaseException, count: bool = True) -> None:
        """A forward pass raised (the rows it carried have been failed).

        Args:
            count: False for a pass that only narrows down an already counted failure (a row retried alone).
        """
        with self._lock:
            self._last_progress = self._clock()
            self._pass_started = None
            if not count:
                return
            self._failed_in_a_row += 1
            self._last_failure = f"{type(exc).__name__}: {exc}"[:300]

    def mark_fatal(self, reason: str) -> None:
        with self._lock:
            self._fatal = self._fatal or reason

    def problem(self, busy: bool, thread_alive: bool = True) -> str | None:
        """Why the engine is unhealthy now, or None.

        Args:
            busy: whether rows are decoding or requests are waiting.
            thread_alive: whether the engine thread is still running.
        """
        with self._lock:
            if not thread_alive:
                return "the engine thread has stopped"
            if self._fatal:
                return self._fatal
            if self._failed_in_a_row >= self.max_failed_passes:
                return f"{self._failed_in_a_row} forward passes failed in a row (last: {self._last_failure})"
            now = self._clock()
            if self._pass_started is not None and now - self._pass_started > self.stall_timeout_s:
                return f"a forward pass has run for {now - self._pass_started:.0f}s (a hung device or model?)"
            stalled = now - self._last_progress
            if busy and stalled > self.stall_timeout_s:
                return f"no forward pass finished for {stalled:.0f}s while requests wait (a hung device or model?)"
            return None

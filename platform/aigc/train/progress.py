"""Training progress: rank 0 measures each step; the driver draws it.

The worker side (:class:`StepProgress`) formats a line every N steps and hands it to a sink: a
``ray.util.queue.Queue`` that the driver created (:class:`StepFeed`), or ``print`` when nothing listens. The
driver side reads that queue on a thread and moves its stage line (:class:`aigc.console.StageLine`), so the
console shows one live line per run while Ray's worker output stays in the session's log files.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from aigc.console import StageLine

__all__ = ["StepFeed", "StepProgress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``."""
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class StepProgress:
    """``[train] step 40/120 (epoch 2/3)  loss 1.2345  lr 1.2e-04  3,456 tok/s  ETA 1m05s`` every N steps.

    Throughput and ETA count only the steps of this attempt (a resumed run does not inherit the old rate).

    Args:
        sink: receives ``{"step", "total", "line"}`` (and ``{"note"}`` from :meth:`note`); None prints the line.
    """

    def __init__(
        self,
        total_steps: int,
        epochs: int,
        every: int,
        start_step: int,
        enabled: bool,
        sink: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.total, self.epochs, self.every, self.enabled = total_steps, epochs, every, enabled
        self._sink = sink or (lambda event: print(event.get("line") or event["note"], flush=True))
        self._t0, self._start = time.monotonic(), start_step
        self._tokens = 0.0

    def step(self, step: int, epoch: int, loss: float, lr: float, tokens: float) -> float:
        """Record one optimizer step; report every ``every`` steps and at the last. Returns this attempt's tok/s."""
        self._tokens += tokens
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        rate = self._tokens / elapsed
        if self.enabled and (step % self.every == 0 or step == self.total):
            eta = elapsed / max(step - self._start, 1) * (self.total - step)
            line = (
                f"[train] step {step}/{self.total} (epoch {epoch + 1}/{self.epochs})  loss {loss:.4f}  "
                f"lr {lr:.1e}  {rate:,.0f} tok/s  ETA {format_duration(eta)}"
            )
            self._sink({"step": step, "total": self.total, "line": line})
        return rate

    def note(self, text: str) -> None:
        """A line worth keeping (early stop), from rank 0 only."""
        if self.enabled:
            self._sink({"note": text})


class StepFeed:
    """Driver side: a Ray queue for rank 0's progress events, drained into ``line`` while training runs.

    ``sink`` is what the workers call (it travels in the :class:`~aigc.train.loop.WorkerConfig`). A worker that
    cannot reach the queue (the driver has gone) drops the event rather than fail training.
    """

    def __init__(self, line: StageLine) -> None:
        from ray.util.queue import Queue

        self.line = line
        # num_cpus=0: the queue must never wait for (or hold) a CPU the workers need.
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="aigc-train-progress", daemon=True)

    @property
    def sink(self) -> Callable[[dict[str, Any]], None]:
        return _QueueSink(self.queue)

    def __enter__(self) -> StepFeed:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        # The last events, then the queue's actor; neither may hide the error a failed run is raising.
        with contextlib.suppress(Exception):
            self._show(self.queue.get_nowait_batch(self.queue.qsize()))
        with contextlib.suppress(Exception):
            self.queue.shutdown()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self._show([self.queue.get(timeout=0.5)])
            except Empty:
                continue
            except Exception:  # noqa: BLE001 (the queue's actor or the cluster went away: the run reports that)
                return

    def _show(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            if "note" in e:
                self.line.log(e["note"].removeprefix("[train] "))
            else:
                self.line.update(done=e["step"], total=e["total"], text=e["line"].removeprefix("[train] "))


class _QueueSink:
    """Puts events in the driver's queue; picklable, so it travels to the workers."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def __call__(self, event: dict[str, Any]) -> None:
        # The driver stopped listening (or the queue is full): progress is not worth failing a run for.
        with contextlib.suppress(Exception):
            self.queue.put_nowait(event)

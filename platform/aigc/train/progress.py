"""The per-step progress line a training run prints from rank 0."""

from __future__ import annotations

import time

__all__ = ["StepProgress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``."""
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class StepProgress:
    """``[train] step 40/120 (epoch 2/3)  loss 1.2345  lr 1.2e-04  3,456 tok/s  ETA 1m05s`` every N steps.

    Throughput and ETA count only the steps of this attempt (a resumed run does not inherit the old rate).
    """

    def __init__(self, total_steps: int, epochs: int, every: int, start_step: int, enabled: bool) -> None:
        self.total, self.epochs, self.every, self.enabled = total_steps, epochs, every, enabled
        self._t0, self._start = time.monotonic(), start_step
        self._tokens = 0.0

    def step(self, step: int, epoch: int, loss: float, lr: float, tokens: float) -> float:
        """Record one optimizer step; print every ``every`` steps and at the last. Returns this attempt's tok/s."""
        self._tokens += tokens
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        rate = self._tokens / elapsed
        if self.enabled and (step % self.every == 0 or step == self.total):
            eta = elapsed / max(step - self._start, 1) * (self.total - step)
            print(
                f"[train] step {step}/{self.total} (epoch {epoch + 1}/{self.epochs})  loss {loss:.4f}  "
                f"lr {lr:.1e}  {rate:,.0f} tok/s  ETA {format_duration(eta)}",
                flush=True,
            )
        return rate

"""One readable line per sweep event, in place of Tune's status tables (which flood non-TTY logs)."""

from __future__ import annotations

from typing import Any

import ray.tune

__all__ = ["SweepProgress"]


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class SweepProgress(ray.tune.Callback):
    """Prints ``[sweep] trial 2/4 epoch 3: eval_loss 0.0123 (1 running, 2 done)`` as trials start, report and end.

    Args:
        metric: the metric shown with each result.
        num_samples: trials in the sweep (for the "k/N" numbering).
        print_fn: where lines go (``print`` by default).
    """

    def __init__(self, metric: str, num_samples: int, print_fn: Any = print):
        self.metric, self.num_samples, self._print = metric, num_samples, print_fn
        self._number: dict[str, int] = {}

    def _name(self, trial: Any) -> str:
        # Tune numbers trial ids "<experiment>_00003"; that index survives a restored sweep, arrival order does not
        suffix = trial.trial_id.rsplit("_", 1)[-1]
        n = int(suffix) + 1 if suffix.isdigit() else self._number.setdefault(trial.trial_id, len(self._number) + 1)
        return f"trial {n}/{self.num_samples}"

    @staticmethod
    def _counts(trials: list[Any]) -> str:
        running = sum(t.status == "RUNNING" for t in trials)
        ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        return f"{running} running, {ended} done"

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(trial.config.items()))
        self._print(f"[sweep] {self._name(trial)} started: {params}", flush=True)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        shown = f"{self.metric} {value:.4f}" if isinstance(value, (int, float)) else f"{self.metric} -"
        epoch = result.get("epoch", result.get("training_iteration"))
        self._print(f"[sweep] {self._name(trial)} epoch {epoch}: {shown} ({self._counts(trials)})", flush=True)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        epochs = (trial.last_result or {}).get("epoch", "?")
        self._print(f"[sweep] {self._name(trial)} ended after {epochs} epoch(s) ({self._counts(trials)})", flush=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._print(f"[sweep] {self._name(trial)} FAILED; see {trial.path} ({self._counts(trials)})", flush=True)

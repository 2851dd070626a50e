"""The sweep's live line, in place of Tune's status tables (which flood non-TTY logs).

Tune calls these callbacks in the driver, so they draw straight onto the stage line of :mod:`aigc.console`: a
live bar of finished trials whose text follows the latest event, and one kept line per finished trial.
"""

from __future__ import annotations

from typing import Any

import ray.tune

from aigc.console import StageLine

__all__ = ["SweepProgress"]


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class SweepProgress(ray.tune.Callback):
    """``[sweep] trial 2/4 epoch 0.33: eval_loss 0.0123 (1 running, 2 done)`` as trials start and report, and
    ``[sweep] trial 2/4 ended after 1 epoch(s): eval_loss 0.0101 (lr=0.004, r=8)`` kept for each finished trial.

    Args:
        metric: the metric shown with each result.
        num_samples: trials in the sweep (for the "k/N" numbering and the bar).
        line: the stage line to draw on (the caller enters it around ``Tuner.fit``); None: plain lines.
    """

    def __init__(self, metric: str, num_samples: int, line: StageLine | None = None):
        self.metric, self.num_samples = metric, num_samples
        self._line = line or StageLine("sweep", num_samples, live=False)
        self._number: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment; a live bar (a thread) does not pickle, nor outlive it.
        return {**self.__dict__, "_line": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._line = StageLine("sweep", self.num_samples, live=False)

    def _name(self, trial: Any) -> str:
        # Tune numbers trial ids "<experiment>_00003"; that index survives a restored sweep, arrival order does not
        suffix = trial.trial_id.rsplit("_", 1)[-1]
        n = int(suffix) + 1 if suffix.isdigit() else self._number.setdefault(trial.trial_id, len(self._number) + 1)
        return f"trial {n}/{self.num_samples}"

    @staticmethod
    def _ended(trials: list[Any]) -> int:
        return sum(t.status in ("TERMINATED", "ERROR") for t in trials)

    def _counts(self, trials: list[Any]) -> str:
        running = sum(t.status == "RUNNING" for t in trials)
        return f"{running} running, {self._ended(trials)} done"

    def _shown(self, result: dict | None) -> str:
        value = (result or {}).get(self.metric)
        return f"{self.metric} {value:.4f}" if isinstance(value, (int, float)) else f"{self.metric} -"

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._line.update(text=f"{self._name(trial)} started ({self._counts(trials)})")

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        epoch = result.get("epoch", result.get("training_iteration"))
        text = f"{self._name(trial)} epoch {epoch}: {self._shown(result)} ({self._counts(trials)})"
        self._line.update(done=self._ended(trials), text=text)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(trial.config.items()))
        self._line.log(f"{self._name(trial)} ended after {last.get('epoch', '?')} epoch(s): {self._shown(last)} "
                       f"({params})")  # fmt: skip
        self._line.update(done=self._ended(trials), text=f"({self._counts(trials)})", plain=False)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._line.log(f"{self._name(trial)} FAILED; see {trial.path} ({self._counts(trials)})")
        self._line.update(done=self._ended(trials), plain=False)

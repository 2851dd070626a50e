"""Run stages in order, each skipped when it already succeeded with the same fingerprint and its output is there.

A stage's fingerprint covers its inputs and its upstream stage's fingerprint (:mod:`aigc.pipeline.fingerprint`),
so a changed key reruns the stages that read it and everything downstream of them, nothing upstream. A stage
that fails is recorded as failed and stops the run; the next run skips the stages before it (same fingerprints,
outputs present) and starts again at the failed one. Each stage prints one line: ran, skipped or failed, and
its time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from aigc.pipeline.fingerprint import fingerprint
from aigc.pipeline.state import PipelineState, StageRecord

__all__ = ["Outputs", "Stage", "StageOutcome", "run_stages"]

Outputs = dict[str, dict[str, Any]]  # stage name -> what it returned (JSON-able), for the stages after it


def _present(_: dict[str, Any]) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline.

    Attributes:
        name: the stage's name in the state file and the progress lines.
        inputs: upstream outputs -> what the stage reads (JSON-able); hashed into its fingerprint.
        run: upstream outputs -> its own outputs (JSON-able), recorded in the state file.
        upstream: the stage whose fingerprint is part of this one's (None: depends on no stage's output).
        exists: whether recorded outputs are still there (a file, a registry version, a running app).
        cached: False for a stage that runs every time (a check of the live system).
    """

    name: str
    inputs: Callable[[Outputs], dict[str, Any]]
    run: Callable[[Outputs], dict[str, Any]]
    upstream: str | None = None
    exists: Callable[[dict[str, Any]], bool] = _present
    cached: bool = True


@dataclass
class StageOutcome:
    name: str
    outcome: Literal["ran", "skipped", "failed"]
    elapsed_s: float
    fingerprint: str
    outputs: dict[str, Any]


def _line(i: int, n: int, o: StageOutcome, width: int, detail: str) -> str:
    return f"[pipeline] {i}/{n} {o.name:<{width}} {o.outcome:<7} {o.elapsed_s:7.1f}s  {detail}"


def run_stages(stages: list[Stage], state: PipelineState, echo: Callable[[str], None] = print) -> list[StageOutcome]:
    """Run ``stages`` in order against ``state`` (updated after each stage); returns every stage's outcome.

    Raises:
        Whatever a stage raised, after recording it as failed and printing its line; later stages do not run.
    """
    outputs: Outputs = {}
    prints: dict[str, str] = {}
    outcomes: list[StageOutcome] = []
    width = max(len(s.name) for s in stages)
    for i, stage in enumerate(stages, 1):
        t0, fp = time.monotonic(), ""
        try:
            if stage.upstream is not None and stage.upstream not in prints:
                raise ValueError(f"stage {stage.name!r}: its upstream {stage.upstream!r} does not run before it")
            fp = fingerprint(stage.inputs(outputs), prints.get(stage.upstream) if stage.upstream else None)
            rec = state.done(stage.name, fp) if stage.cached else None
            if rec is not None and stage.exists(rec.outputs):
                outcome = StageOutcome(stage.name, "skipped", time.monotonic() - t0, fp, rec.outputs)
                detail = f"(same fingerprint {fp})"
            else:
                result = stage.run(outputs)
                outcome = StageOutcome(stage.name, "ran", time.monotonic() - t0, fp, result)
                state.record(stage.name, StageRecord("done", fp, result, round(outcome.elapsed_s, 2)))
                detail = f"(fingerprint {fp})"
        except BaseException as exc:
            elapsed = time.monotonic() - t0
            error = (str(exc).strip().splitlines() or [""])[0][:300]
            state.record(stage.name, StageRecord("failed", fp, {}, round(elapsed, 2), error=error))
            failed = StageOutcome(stage.name, "failed", elapsed, fp, {})
            echo(_line(i, len(stages), failed, width, f"{type(exc).__name__}; re-run the same command to continue "
                                                        f"from this stage"))  # fmt: skip
            raise
        echo(_line(i, len(stages), outcome, width, detail))
        outputs[stage.name], prints[stage.name] = outcome.outputs, fp
        outcomes.append(outcome)
    return outcomes

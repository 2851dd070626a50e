"""The promotion gate (``pipeline.promote_if``): ``aigc eval`` decides whether the new version is promoted.

The ``gate`` stage runs after ``register`` and before ``promote``. It puts the version the promoted name serves
now (``previous``) and the newly registered one side by side on ``generate.input``'s held-out prompts
(:func:`aigc.batch.evaluate.run_eval`, which writes ``<eval_dir>/report.json`` and its plot) and applies the
gate to the new version's score. A version that fails the gate stays registered and is not promoted: the
``promote`` stage says so and names the command that would promote it anyway; the smoke test then checks the
version still served. With nothing promoted yet, ``eval.METRIC OP previous`` passes (there is nothing to be worse
than), and a fixed bar (``eval.rouge_l > 0.3``) is applied as written.
"""

from __future__ import annotations

from typing import Any

from aigc.config import PlatformConfig
from aigc.config.pipeline import parse_gate
from aigc.pipeline.feedback_round import served_name
from aigc.pipeline.runner import Outputs, Stage

__all__ = ["gate_stage", "previous_version"]


def previous_version(cfg: PlatformConfig) -> str | None:
    """The version the promoted name serves now (``name:vN``); None when it names nothing yet."""
    from aigc.registry import Registry, RegistryError

    try:
        return Registry(cfg.registry_dir).resolve(served_name(cfg)).model_id
    except (RegistryError, KeyError):
        return None


def gate_stage(cfg: PlatformConfig) -> Stage:
    """``gate``: evaluate the new version against the served one and record whether it may be promoted."""
    gate = parse_gate(cfg.pipeline.promote_if or "")

    def inputs(done: Outputs) -> dict[str, Any]:
        g = cfg.generate
        return {"gate": str(gate), "new": done["register"]["registry_id"], "served": served_name(cfg),
                "input": g.input, "max_tokens": g.max_tokens, "judge": g.judge.url if g.judge else None}  # fmt: skip

    def run(done: Outputs) -> dict[str, Any]:
        from aigc.batch.evaluate import eval_dir, eval_table, run_eval

        new, previous = done["register"]["registry_id"], previous_version(cfg)
        previous = None if previous == new else previous  # a re-run after the promote: compare with nothing
        report = run_eval(cfg, [previous, new] if previous else [new])
        print(eval_table(report))
        scores = {m["version"]: m[gate.metric] for m in report["models"].values()}
        new_score, old_score = scores[new], scores.get(previous) if previous else None
        if new_score is None:
            raise ValueError(f"pipeline.promote_if: the eval report has no {gate.metric} (set generate.judge.url "
                             "for judge_win_rate)")  # fmt: skip
        passed = gate.holds(new_score, old_score)
        versus = f"{previous}'s {old_score:.4f}" if old_score is not None else "nothing served yet"
        print(f"[gate] {gate}: {new} scores {new_score:.4f} against {versus}: {'promote' if passed else 'hold'}")
        return {"passed": passed, "new": new_score, "previous": old_score, "previous_version": previous,
                "report": eval_dir(cfg)}  # fmt: skip

    return Stage("gate", inputs, run, upstream="register")

"""The ``pipeline`` section (``aigc pipeline``) and the grammar of its promotion gate (``pipeline.promote_if``)."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from aigc.config.section import _Section

__all__ = ["GATE_METRICS", "PipelineConfig", "PromoteGate", "parse_gate"]

GATE_METRICS: dict[str, bool] = {
    "exact_match": True,
    "rouge_l": True,
    "judge_win_rate": True,
    "win_rate": True,
    "loss": False,
    "perplexity": False,
}
"""The ``aigc eval`` report's metrics a gate may name, and whether higher is better."""

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}
_GATE = re.compile(r"^\s*eval\.([a-z_]+)\s*(>=|<=|>|<)\s*(previous|[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")


@dataclass(frozen=True)
class PromoteGate:
    """``eval.METRIC OP previous`` or ``eval.METRIC OP NUMBER``: the new version's score on the held-out prompts
    against the version it would replace (``previous``) or a fixed bar."""

    metric: str
    op: str
    threshold: float | None  # None = the previous version's score

    def holds(self, new: float, previous: float | None) -> bool:
        """Whether ``new`` passes; with no previous version to compare against, a ``previous`` gate passes."""
        bar = previous if self.threshold is None else self.threshold
        return True if bar is None else _OPS[self.op](new, bar)

    def __str__(self) -> str:
        return f"eval.{self.metric} {self.op} {'previous' if self.threshold is None else self.threshold}"


def parse_gate(text: str) -> PromoteGate:
    """``pipeline.promote_if`` as a :class:`PromoteGate`.

    Raises:
        ValueError: naming what is wrong and the accepted form.
    """
    m = _GATE.match(text)
    if not m:
        raise ValueError(
            f"promote_if {text!r} is not a gate: write 'eval.METRIC OP previous' or 'eval.METRIC OP NUMBER' "
            f"(OP one of >=, >, <=, <), e.g. 'eval.exact_match >= previous'"
        )
    metric, op, bar = m.groups()
    if metric not in GATE_METRICS:
        raise ValueError(f"promote_if names eval.{metric}; the eval report has: {', '.join(GATE_METRICS)}")
    return PromoteGate(metric, op, None if bar == "previous" else float(bar))


class PipelineConfig(_Section):
    """``aigc pipeline``: preprocess -> sweep -> train -> register (+ promote) -> deploy -> smoke test, each stage
    skipped when its inputs have not changed since it last succeeded (:mod:`aigc.pipeline`)."""

    sweep: bool = Field(
        True, description="Sweep (tune section) and train the best trial's values; false = train the config as is."
    )
    feedback: str | None = Field(
        None,
        min_length=1,
        description="An `aigc feedback export` file (messages format) mixed into data.path as one more source.",
    )
    feedback_weight: float = Field(1.0, gt=0, description="Mixture weight of the feedback rows (2 = each twice).")
    feedback_method: Literal["sft", "dpo"] = Field(
        "sft",
        description="How the feedback round learns: sft mixes `aigc feedback export` rows into data.path; dpo "
        "trains on `aigc feedback export --pairs` alone (train.preference.method=dpo), starting from the version "
        "the alias serves when the round starts (train.init_adapter), which is also the DPO reference.",
    )
    promote_if: str | None = Field(
        None,
        description="Promote only when `aigc eval` on the eval section's prompts says so, e.g. "
        "'eval.exact_match >= previous' or 'eval.rouge_l > 0.3' (metrics: exact_match, rouge_l, judge_win_rate, "
        "loss, perplexity); the new version stays registered either way. Unset = always promote.",
    )
    promote: bool = Field(True, description="Move the alias to the newly registered version.")
    alias: str | None = Field(
        None,
        pattern=r"^[A-Za-z][A-Za-z0-9._-]{0,63}$",
        description="The alias promoted (name:ALIAS); unset = the bare name, what `model: <adapter_name>` serves.",
    )
    deploy: bool = Field(True, description="Deploy (or update) the Serve app on this cluster, then smoke-test it.")
    smoke_prompt: str = Field(
        "Hello, where is my order?", min_length=1, description="Asked of the promoted model through the openai client."
    )
    smoke_max_tokens: int = Field(16, ge=1, description="Answer length of the smoke test.")
    keep_serving: bool = Field(
        True,
        description="On an embedded local cluster, keep serving after the pipeline until Ctrl-C (the app ends "
        "with the process); a joined cluster (RAY_ADDRESS) keeps the app anyway.",
    )

    @field_validator("alias")
    @classmethod
    def _not_reserved(cls, v: str | None) -> str | None:
        if v is not None and (re.fullmatch(r"v[0-9]+", v) or v == "latest"):
            raise ValueError(f"{v!r} is reserved: 'vN' names a version and 'latest' the newest one")
        return v

    @field_validator("promote_if")
    @classmethod
    def _gate(cls, v: str | None) -> str | None:
        if v is not None:
            parse_gate(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if self.alias is not None and not self.promote:
            raise ValueError(f"alias {self.alias!r} is set but promote is false: nothing would move it")
        if self.promote_if is not None and not self.promote:
            raise ValueError(f"promote_if {self.promote_if!r} is set but promote is false: nothing would be gated")
        if self.feedback_method == "dpo" and not self.feedback:
            raise ValueError(
                "feedback_method=dpo trains on preference pairs: set pipeline.feedback to an "
                "`aigc feedback export --pairs` file"
            )
        return self

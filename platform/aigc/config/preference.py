"""The ``train.preference`` section (DPO, ORPO) and the checks of ``data.preference`` rows."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from aigc.config.section import _Section

__all__ = ["PreferenceConfig", "check_pair_data"]


class PreferenceConfig(_Section):
    method: Literal["dpo", "orpo"] | None = Field(
        None,
        description="Preference tuning on data.preference pairs: dpo (LoRA; the reference is the base with adapters "
        "disabled) or orpo (no reference; LoRA or full); unset = supervised fine-tuning.",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="DPO: how close the policy stays to the reference (higher = closer); ORPO: the weight of the "
        "odds-ratio term against the chosen answer's NLL.",
    )
    loss_type: Literal["sigmoid", "hinge", "ipo"] = Field(
        "sigmoid", description="DPO variant: sigmoid (DPO paper), hinge (SLiC) or ipo (IPO); TRL's formulas."
    )


def check_pair_data(data: Any) -> Any:
    """``data`` (a DataConfig) with ``preference`` set must have prompts and answers in unpacked rows.

    Raises:
        ValueError: naming the setting to change.
    """
    text = [src.path for src in data.sources() if src.format == "text"] if data.preference else []
    if text or (data.preference and data.packing):
        why = f"{text[0]} has format 'text': use alpaca, sharegpt or messages" if text else "set data.packing=false"
        raise ValueError(f"data.preference=true needs unpacked rows of prompts and answers: {why}")
    return data

"""The ``generate`` section: ``aigc generate`` (batch generation on a Ray Data actor pool) and ``aigc eval``
(several models side by side on the same held-out prompts)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from aigc.config.section import _Section

__all__ = ["BASE_MODEL", "GenerateConfig", "JudgeConfig", "check_model_ref"]

BASE_MODEL = "base"
"""The model reference that means the base model with no adapter."""

# name, name:vN, name@vN, name:ALIAS (the registry's grammar; the registry itself says whether it exists)
_MODEL_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:[:@][A-Za-z0-9][A-Za-z0-9._-]*)?$")

_JUDGE_PROMPT = (
    "Question:\n{prompt}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\n"
    "Which answer is better? Reply with the single letter A or B."
)


def check_model_ref(ref: str) -> str:
    """``ref`` if it reads as a model reference (``base``, name, name:vN, name@vN, name:ALIAS).

    Raises:
        ValueError: naming what a reference looks like.
    """
    if not _MODEL_REF.match(ref):
        raise ValueError(f"{ref!r} is not a model: use 'base', a registered name, name:vN, name@vN or name:ALIAS")
    return ref


class JudgeConfig(_Section):
    """An OpenAI-compatible chat endpoint that compares two answers (``aigc eval``'s judge win rate)."""

    url: str = Field(..., min_length=1, description="Base URL of the endpoint, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(..., min_length=1, description="The model the judge request names.")
    prompt: str = Field(
        _JUDGE_PROMPT,
        description="The judge's instructions with {prompt}, {a} and {b} (the reference model's answer is A or B, "
        "alternating by row so position bias cancels); the judge replies A or B.",
    )
    api_key_env: str | None = Field(
        None, min_length=1, description="Environment variable holding the judge's API key; unset = no key."
    )
    max_tokens: int = Field(4, ge=1, description="Longest judge reply, in tokens.")
    timeout_s: float = Field(60.0, gt=0, description="Deadline of one judge request.")

    @field_validator("prompt")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        missing = [p for p in ("{prompt}", "{a}", "{b}") if p not in v]
        if missing:
            raise ValueError(f"must contain {', '.join(missing)}")
        return v


class GenerateConfig(_Section):
    """Batch generation with the serving engine (``aigc generate``) and model evaluation (``aigc eval``)."""

    input: str | None = Field(
        None,
        min_length=1,
        description="Prompts: a file, directory or glob of a dataset in a format the preprocessor reads, or a "
        "JSONL/Parquet file with a prompt column (local, s3://, gs://). Required by `aigc generate` and `aigc eval`.",
    )
    format: Literal["auto", "alpaca", "messages", "sharegpt", "text", "prompt"] = Field(
        "auto",
        description="Row format: a data format (the conversation without its last answer is the prompt, that answer "
        "the reference), prompt (the prompt_column text as a user turn) or auto (by the first row's fields).",
    )
    prompt_column: str = Field("prompt", min_length=1, description="The prompt column of format 'prompt'.")
    limit: int | None = Field(None, ge=1, description="Use only the first N rows of the input; unset = all.")
    output: str | None = Field(
        None, min_length=1, description="Output directory of `aigc generate`; unset = <output_dir>/generate."
    )
    output_format: Literal["jsonl", "parquet"] = Field("jsonl", description="File format of the generations.")
    model: str = Field(
        BASE_MODEL, description="What `aigc generate` runs: 'base', a registered name, name:vN, name@vN or name:ALIAS."
    )
    max_tokens: int = Field(64, ge=1, description="Longest answer, in tokens.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature; 0 = greedy (reproducible).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of this mass.")
    seed: int | None = Field(
        None, description="Sampling seed: row i samples with seed + i (same output on a re-run); unset = random."
    )
    actors: int = Field(
        1, ge=1, description="Ray Data actors generating at once, each holding one engine (the model's memory each)."
    )
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per actor (torch's threads in it).")
    gpus_per_actor: float = Field(
        0.0, ge=0, description="GPUs reserved per actor; > 0 runs the engine on the GPU Ray gives the actor."
    )
    batch_size: int = Field(
        32,
        ge=1,
        description="Rows per part: an actor decodes two parts' rows together (continuous batching) and publishes "
        "each part as one file; a re-run skips published parts. Higher = fewer files, more work lost to a kill.",
    )
    eval_dir: str | None = Field(
        None, min_length=1, description="Where `aigc eval` writes report.json and its plot; unset = <output_dir>/eval."
    )
    eval_models: list[str] = Field(
        default_factory=lambda: [BASE_MODEL],
        min_length=1,
        description="The models `aigc eval` compares when --models is not given; the first is the reference.",
    )
    eval_pairs: str | None = Field(
        None,
        min_length=1,
        description="Preference pairs scored by `aigc eval` (log-probabilities of chosen and rejected answers): an "
        "`aigc feedback export --pairs` file, or alpaca/sharegpt/messages rows with chosen/rejected.",
    )
    eval_pairs_format: Literal["auto", "alpaca", "messages", "sharegpt"] = Field(
        "auto", description="Row format of eval_pairs; auto = by the first row's fields."
    )
    judge: JudgeConfig | None = Field(None, description="Optional judge of `aigc eval` (judge_win_rate).")

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return check_model_ref(v)

    @field_validator("eval_models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        for ref in v:
            check_model_ref(ref)
        if len(set(v)) != len(v):
            raise ValueError(f"names a model twice: {v}")
        return v

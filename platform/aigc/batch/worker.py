"""The Ray Data actor of ``aigc generate``: one :class:`~aigc.serve.engine.GenerationEngine` per actor, the same
engine, chat template and sampling code as a serving replica.

Each batch Ray Data hands the actor is one part: its rows are submitted to the engine together, so they decode
in one running batch (continuous batching: a short answer leaves, the others go on), then the part is published
whole (:func:`aigc.batch.parts.publish_part`) before the actor reports it. A row that fails (a record that does
not fit its format, a prompt the engine refuses, a failed generation) is recorded in the part with its reason;
the others are unaffected. An engine that cannot generate at all (:class:`~aigc.errors.ServiceUnavailableError`:
closed, unhealthy, a failed forward pass shared by the whole batch) is no fault of the rows: the part is not
published and the run stops, so that a re-run generates those rows again.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import torch

from aigc import storage
from aigc.batch.inputs import PromptRow, to_prompt
from aigc.batch.parts import publish_part
from aigc.data.formats import RowError
from aigc.errors import AigcError, ServiceUnavailableError
from aigc.serve.engine import GenerationEngine, SamplingParams

__all__ = ["EngineSettings", "GenerateActor", "generate_rows"]


@dataclass(frozen=True)
class EngineSettings:
    """What each actor builds its engine from and generates with (plain values: they travel to the actors)."""

    base_model: str  # the local directory or snapshot every process loads
    dtype: str
    trust_remote_code: bool
    adapter_uri: str | None
    label: str
    version: str
    fmt: str
    prompt_column: str
    system_prompt: str | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    max_batch_size: int
    output: str


def build_engine(s: EngineSettings) -> tuple[GenerationEngine, str | None]:
    """The engine for ``s`` and the name its adapter is loaded as (None = the base model)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray hides GPUs from an actor without num_gpus
    engine = GenerationEngine(s.base_model, dtype=s.dtype, device=device, trust_remote_code=s.trust_remote_code,
                              max_batch_size=s.max_batch_size)  # fmt: skip
    if s.adapter_uri is None:
        return engine, None
    engine.load_adapter(storage.local_dir(s.adapter_uri), "batch_adapter")
    return engine, "batch_adapter"


def _params(s: EngineSettings, index: int) -> SamplingParams:
    # Row i samples with seed + i: the same answer whichever part or actor it lands in, and on a re-run.
    seed = None if s.seed is None else s.seed + index
    return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=seed)


async def _one(engine: Any, adapter: str | None, s: EngineSettings, index: int, raw: str) -> dict:
    try:
        row: PromptRow = to_prompt(raw, s.fmt, s.prompt_column, s.system_prompt)
    except RowError as err:
        return {"index": index, "error": err.reason, "detail": err.detail, "raw": raw}
    try:
        done = await engine.agenerate(row.prompt, _params(s, index), adapter=adapter)
    except ServiceUnavailableError:
        raise  # the engine's fault, not the row's: the part stays unpublished (module doc)
    except AigcError as exc:  # a prompt the engine refuses, or a failed row: that row alone
        code = getattr(exc, "code", None) or type(exc).__name__
        return {"index": index, "error": str(code), "detail": str(exc), "raw": raw}
    except Exception as exc:  # a bug in one row must not lose the part
        return {"index": index, "error": "generation_error", "detail": f"{type(exc).__name__}: {exc}", "raw": raw}
    return {"index": index, "prompt": row.shown, "messages": row.messages, "reference": row.reference,
            "answer": done.text, "model": s.label, "model_version": s.version, "error": None,
            "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "finish_reason": done.finish_reason}  # fmt: skip


def generate_rows(engine: Any, adapter: str | None, s: EngineSettings, indices: list[int],
                  raws: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    """Every row's output dict (or its error), generated together in the engine's running batch.

    Raises:
        ServiceUnavailableError: the engine could not generate (no row's fault): nothing is to be published.
    """

    async def run() -> list[dict[str, Any]]:
        return await asyncio.gather(*(_one(engine, adapter, s, i, r) for i, r in zip(indices, raws, strict=True)))

    return asyncio.run(run())


class GenerateActor:
    """``map_batches`` callable class: builds the engine once, then generates and publishes one part per batch."""

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.engine, self.adapter = build_engine(settings)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        started = time.monotonic()
        indices = [int(i) for i in batch["index"]]
        rows = generate_rows(self.engine, self.adapter, self.settings, indices, [str(r) for r in batch["raw"]])
        publish_part(self.settings.output, rows)
        ok = [r for r in rows if r.get("error") is None]
        return {
            "rows": [len(rows)],
            "errors": [len(rows) - len(ok)],
            "completion_tokens": [sum(r["completion_tokens"] for r in ok)],
            "seconds": [time.monotonic() - started],
        }

"""Batch generation and evaluation with the serving engine, on Ray Data.

- :mod:`aigc.batch.generate`: ``aigc generate``, the engine over a dataset on an actor pool, resumable;
- :mod:`aigc.batch.evaluate`: ``aigc eval``, several models on the same held-out prompts, side by side;
- :mod:`aigc.batch.inputs` (records to prompts), :mod:`aigc.batch.models` (model references),
  :mod:`aigc.batch.parts` (published parts, resuming, merging), :mod:`aigc.batch.worker` (the actor).
"""

from aigc.batch.generate import GenerateResult, generate_output, run_generate

__all__ = ["GenerateResult", "generate_output", "run_generate"]

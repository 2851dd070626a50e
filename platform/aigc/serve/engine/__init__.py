"""The generation engine (no Ray import): continuous batching over one base model and many LoRA adapters.

    engine = GenerationEngine("assets/tiny-base", max_batch_size=32)
    engine.load_adapter("runs/demo/adapter", "support_v1")
    engine.generate([{"role": "user", "content": "Where is my parcel?"}], SamplingParams(temperature=0),
                    adapter="support_v1")

Modules: :mod:`~aigc.serve.engine.core` (the engine and its thread), :mod:`~aigc.serve.engine.batch` (the
running batch: prefill, KV-cache merge, decode, leave), :mod:`~aigc.serve.engine.text` (incremental
detokenization, stop strings), :mod:`~aigc.serve.engine.adapters` (loading and deferred deletion),
:mod:`~aigc.serve.engine.prompts` (prompts to token ids, client text never as control tokens),
:mod:`~aigc.serve.engine.types` (sampling settings, completions, deltas),
:mod:`~aigc.serve.engine.logprobs` (log-probabilities from each step's logits),
:mod:`~aigc.serve.engine.grammar` (``response_format``: JSON grammars as per-row token masks),
:mod:`~aigc.serve.engine.protocol`
(:class:`ServingEngine`: what the ``Generator`` deployment calls, so another engine can replace this one).
"""

from aigc.errors import AdapterLoadError, InvalidRequestError, ModelNotFoundError
from aigc.serve.engine.adapters import BASE_ADAPTER
from aigc.serve.engine.core import GenerationEngine
from aigc.serve.engine.protocol import ServingEngine
from aigc.serve.engine.types import Completion, Delta, Prompt, ResponseFormat, SamplingParams

__all__ = [
    "BASE_ADAPTER",
    "AdapterLoadError",
    "Completion",
    "Delta",
    "GenerationEngine",
    "InvalidRequestError",
    "ModelNotFoundError",
    "Prompt",
    "ResponseFormat",
    "SamplingParams",
    "ServingEngine",
]

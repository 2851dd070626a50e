"""Structured output's cost: a JSON-schema-constrained run against an unconstrained one, same engine and prompts.

    .venv/bin/python bench/structured_output.py [--requests 64] [--max-tokens 64] [--concurrency 32]
                                                [--model-shape SmolLM2-135M] [--threads 1]

One engine (``aigc.serve.engine.GenerationEngine``, no Ray, no Serve; ``--model-shape``: a random-weight model
with a real model's layer shapes, ``bench/_shapes.py``), the same prompts and settings (temperature 1, seeded,
``--concurrency`` requests in flight), run three times after a warm-up: unconstrained, every request with
``response_format: json_schema`` (an order with free strings and an array, so rows tend to run to
``max_tokens`` as unconstrained ones do), then unconstrained again (the two unconstrained runs bound the
noise). Each run reports output tokens/s, decoding steps, the mean time per step (a step: one forward pass for
every row, sampling and emitting) and, for the constrained run, the time spent filling and applying masks;
then the constrained tokens/s over the mean of the unconstrained ones (the issue's target: >= 0.8).

The grammar is compiled in the warm-up (once per schema, as in serving). Every run is bounded in requests and
each request in time (``TIMEOUT_S``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from _shapes import SHAPES, TINY, build_shape  # noqa: E402  (bench/ is on the path: the script's folder)

from aigc.demo.dataset import demo_eval_prompts  # noqa: E402
from aigc.serve.engine import GenerationEngine, SamplingParams  # noqa: E402
from aigc.serve.engine import scheduler as scheduler_module  # noqa: E402
from aigc.serve.engine.grammar import parse_response_format  # noqa: E402

TIMEOUT_S = 300
ORDER = {
    "type": "object",
    "properties": {
        "customer": {"type": "string"},
        "status": {"enum": ["shipped", "late", "lost", "refunded"]},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["name", "qty"]}},
        "note": {"type": "string"},
    },
    "required": ["customer", "status", "items", "note"],
}  # fmt: skip
FORMAT = parse_response_format({"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER}})


@dataclass
class Run:
    name: str
    tokens: int
    seconds: float
    steps: int
    step_s: float  # time inside steps (forward, sampling, emitting), summed
    mask_s: float  # of which filling and applying grammar masks

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


class _StepTimer:
    """Counts and times the engine's steps and its mask work by wrapping them (the engine thread's own calls)."""

    def __init__(self, engine: GenerationEngine):
        self.steps, self.step_s, self.mask_s = 0, 0.0, 0.0
        sched = engine._scheduler
        step, mask = sched._step, scheduler_module.mask_rows

        def timed_step() -> None:
            t = time.perf_counter()
            step()
            self.steps += 1
            self.step_s += time.perf_counter() - t

        def timed_mask(*args, **kwargs):
            t = time.perf_counter()
            try:
                return mask(*args, **kwargs)
            finally:
                self.mask_s += time.perf_counter() - t

        sched._step = timed_step
        scheduler_module.mask_rows = timed_mask

    def reset(self) -> None:
        self.steps, self.step_s, self.mask_s = 0, 0.0, 0.0


def _run(engine: GenerationEngine, timer: _StepTimer, name: str, prompts: list[str], params: list[SamplingParams],
         concurrency: int) -> Run:  # fmt: skip
    async def main() -> int:
        sem = asyncio.Semaphore(concurrency)

        async def one(p: str, sp: SamplingParams) -> int:
            async with sem:
                out = await asyncio.wait_for(engine.agenerate(p, sp), TIMEOUT_S)
                return out.completion_tokens

        return sum(await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params, strict=True))))

    timer.reset()
    t0 = time.perf_counter()
    tokens = asyncio.run(main())
    return Run(name, tokens, time.perf_counter() - t0, timer.steps, timer.step_s, timer.mask_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a generator replica's CPUs)")
    ap.add_argument("--model-shape", choices=sorted(SHAPES), help="a random-weight model with this model's shapes")
    args = ap.parse_args()

    model = TINY
    if args.model_shape:
        model = build_shape(args.model_shape, os.path.join(tempfile.gettempdir(), f"aigc-shape-{args.model_shape}"))
    torch.set_num_threads(args.threads)
    engine = GenerationEngine(model, dtype="float32", max_batch_size=max(args.concurrency, 1))
    timer = _StepTimer(engine)
    prompts = [f"A customer wrote: {q}\nThe order as JSON:" for q in demo_eval_prompts(args.requests, seed=99)]
    free = [SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i) for i in range(len(prompts))]
    constrained = [SamplingParams(**{**p.__dict__, "response_format": FORMAT}) for p in free]
    print(
        f"[bench] {args.requests} requests, max_tokens {args.max_tokens}, concurrency {args.concurrency}, "
        f"temperature 1, model {args.model_shape or 'demo tiny-base'}, torch threads {torch.get_num_threads()}"
    )
    _run(engine, timer, "warm-up", prompts[:4], constrained[:4], 4)  # compiles the grammar once
    runs = [
        _run(engine, timer, "unconstrained", prompts, free, args.concurrency),
        _run(engine, timer, "json_schema", prompts, constrained, args.concurrency),
        _run(engine, timer, "unconstrained again", prompts, free, args.concurrency),
    ]
    engine.close()
    print(f"{'run':<20} {'tokens':>7} {'s':>7} {'tokens/s':>9} {'steps':>6} {'ms/step':>8} {'mask ms/step':>12}")
    for r in runs:
        per = 1e3 / max(r.steps, 1)
        print(f"{r.name:<20} {r.tokens:>7} {r.seconds:>7.2f} {r.tokens_per_s:>9.1f} {r.steps:>6} "
              f"{r.step_s * per:>8.2f} {r.mask_s * per:>12.3f}")  # fmt: skip
    base = (runs[0].tokens_per_s + runs[2].tokens_per_s) / 2
    print(f"[bench] json_schema tokens/s = {runs[1].tokens_per_s / base:.2f}x unconstrained (target >= 0.8)")


if __name__ == "__main__":
    main()

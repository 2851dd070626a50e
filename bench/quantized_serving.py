"""Quantized serving (``serve.quantization``): memory, tokens/s and held-out perplexity against full precision.

    .venv/bin/python bench/quantized_serving.py [--model-shape SmolLM2-135M] [--modes none int8]
                                                [--requests 64] [--concurrency 1 32] [--max-tokens 64]

Each mode runs in a fresh process (so memory is the process's own): it loads the serving engine exactly as a
generator replica does (``GenerationEngine(..., quantization=MODE)``), and reports

- **weights**: the size of the model's state (``torch.save`` of its state dict: int8 data and scales for the
  quantized layers), and the growth of the process's resident memory while the engine loads;
- **perplexity** on held-out demo conversations (customer messages the training rows never contain, with the
  demo's reply, rendered by the chat template), computed with the engine's own model;
- **tokens/s** of greedy 64-token replies through the engine at each concurrency (the baseline is the same
  engine in float32, ``none``, measured in the same run).

On the demo model (1.2M parameters, trained) the perplexity is meaningful and the speed is Python overhead; on a
``--model-shape`` (random weights with a real model's layer shapes) the speed is compute and the perplexity
change says how far quantization moves the model's distribution (its absolute value, near the vocabulary size,
is not a quality figure). Loops are bounded: ``--requests`` replies per concurrency, 120 s per reply.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from _shapes import SHAPES, TINY, build_shape  # noqa: E402

TIMEOUT_S = 120


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _heldout(n: int) -> list[list[dict[str, str]]]:
    from aigc.demo.dataset import answer_for, demo_eval_prompts, expected_answer_fields

    convs = []
    for msg in demo_eval_prompts(n, seed=7):
        dept = expected_answer_fields(msg)["department"]
        convs.append([{"role": "user", "content": msg}, {"role": "assistant", "content": answer_for(dept)}])
    return convs


def _state_mb(model) -> float:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 2**20


def _perplexity(engine, convs: list[list[dict[str, str]]]) -> float:
    import torch

    tok, model = engine.tokenizer, engine.model
    nll, count = 0.0, 0
    with torch.no_grad():
        for conv in convs:
            ids = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
            out = model(input_ids=ids, labels=ids)
            n = ids.shape[1] - 1
            nll += out.loss.item() * n
            count += n
    return math.exp(nll / count)


def _throughput(engine, prompts: list[str], max_tokens: int, concurrency: int) -> float:
    from aigc.serve.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0)

    async def main() -> float:
        sem = asyncio.Semaphore(concurrency)

        async def one(p: str) -> int:
            async with sem:
                out = await asyncio.wait_for(engine.agenerate(p, params), TIMEOUT_S)
                return out.completion_tokens

        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(one(p) for p in prompts))
        return sum(tokens) / (time.perf_counter() - t0)

    return asyncio.run(main())


def run_mode(model: str, mode: str, args: dict, out: multiprocessing.Queue) -> None:
    """One mode, in its own process: load, perplexity, then tokens/s at each concurrency."""
    import torch

    torch.set_num_threads(args["threads"])
    from aigc.demo.dataset import demo_eval_prompts
    from aigc.serve.engine import GenerationEngine

    before = _rss_mb()
    engine = GenerationEngine(model, dtype="float32", quantization=mode, max_batch_size=max(args["concurrency"]))
    loaded = _rss_mb() - before
    ppl = _perplexity(engine, _heldout(args["heldout"]))
    prompts = [f"A customer wrote: {q}\nOur reply:" for q in demo_eval_prompts(args["requests"], seed=99)]
    _throughput(engine, prompts[:2], 4, 1)  # warm-up: one-off costs a server pays at start
    speed = {c: _throughput(engine, prompts, args["max_tokens"], c) for c in args["concurrency"]}
    engine.close()
    weights = _state_mb(engine.model)
    out.put({"mode": mode, "weights_mb": weights, "rss_mb": loaded, "perplexity": ppl, "tokens_per_s": speed})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-shape", choices=sorted(SHAPES), help="a random-weight model with this model's shapes")
    ap.add_argument("--modes", nargs="+", default=["none", "int8"], choices=["none", "int8"])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=64, help="held-out conversations for the perplexity")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (a generator replica's CPUs)")
    a = ap.parse_args()
    model = TINY
    if a.model_shape:
        model = build_shape(a.model_shape, os.path.join(tempfile.gettempdir(), f"aigc-shape-{a.model_shape}"))
    args = {"requests": a.requests, "concurrency": a.concurrency, "max_tokens": a.max_tokens,
            "heldout": a.heldout, "threads": a.threads}  # fmt: skip
    ctx = multiprocessing.get_context("spawn")
    results = []
    for mode in a.modes:
        q = ctx.Queue()
        p = ctx.Process(target=run_mode, args=(model, mode, args, q))
        p.start()
        results.append(q.get(timeout=3600))
        p.join()
    base = results[0]
    name = a.model_shape or "demo model (1.2M)"
    print(f"\n[bench] {name}, {a.requests} greedy replies of <= {a.max_tokens} tokens, torch threads {a.threads}")
    head = "".join(f"{f'tok/s c={c}':>13}{'x':>6}" for c in a.concurrency)
    print(f"{'mode':<8}{'weights MB':>12}{'x':>6}{'RSS MB':>8}{'perplexity':>12}{'change':>9}{head}")
    for r in results:
        speed, base_speed = r["tokens_per_s"], base["tokens_per_s"]
        row = "".join(f"{speed[c]:>13.0f}{speed[c] / base_speed[c]:>6.2f}" for c in a.concurrency)
        change = (r["perplexity"] / base["perplexity"] - 1) * 100
        print(f"{r['mode']:<8}{r['weights_mb']:>12.1f}{r['weights_mb'] / base['weights_mb']:>6.2f}{r['rss_mb']:>8.0f}"
              f"{r['perplexity']:>12.3f}{change:>+8.2f}%{row}")  # fmt: skip


if __name__ == "__main__":
    main()

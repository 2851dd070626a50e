"""Serving throughput: the OpenAI app under concurrent load against plain sequential ``generate``.

    .venv/bin/python bench/serve_throughput.py [--requests 96] [--max-tokens 64] [--concurrency 1 8 32]
                                               [--model-shape SmolLM2-135M] [--set serve.cpus_per_replica=1 ...]

``--model-shape`` serves a random-weight model with a real model's layer shapes (``bench/_shapes.py``, no
download) instead of the 1.2M-parameter demo model, so the figures show compute rather than Python overhead;
``--set serve.quantization=int8`` runs the engine and the app quantized (the baseline stays float32).

Baseline (same run, same model, prompts and max_tokens, greedy): one process calling
``model.generate`` for one request after another, in a fresh process with torch's default threads (its
best case: torch used from two threads of one process slows both). Candidates:

1. the engine alone (``aigc.serve.engine.GenerationEngine``, no Ray, no Serve) at each concurrency, with as
   many torch threads as a generator replica gets (``serve.cpus_per_replica``);
2. the Serve app (``aigc serve``: one generator replica) through the official ``openai`` async client on
   loopback, at each concurrency, streaming and not: output tokens/s, p50/p99 latency, time to first token;
3. a mixed run: 32 concurrent requests spread over the base model and 3 LoRA adapters, against the
   single-model run at the same concurrency (target: >= 0.85x). The engine runs it with batched LoRA (one
   product per LoRA layer for all rows, the default) and, unless ``--skip-peft-mix``, again with peft's
   mixed-adapter forward (each LoRA layer split per adapter: the path before batched LoRA), on the same
   adapters; the Serve app runs it with the default.

Every load loop is bounded in count (``--requests``) and time (each request times out after 120 s).
Prints one table and the ratios to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from _adapters import register_random_adapter  # noqa: E402  (bench/ is on the path: the script's folder)
from _shapes import SHAPES, build_shape  # noqa: E402

from aigc.config import load_config, with_values  # noqa: E402
from aigc.demo.dataset import demo_eval_prompts  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TIMEOUT_S = 120


@dataclass
class Run:
    name: str
    concurrency: int
    stream: bool
    requests: int
    output_tokens: int
    seconds: float
    p50_s: float
    p99_s: float
    ttft_p50_s: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def _prompts(n: int) -> list[str]:
    return [f"A customer wrote: {q}\nOur reply:" for q in demo_eval_prompts(n, seed=99)]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# 1. baseline ---------------------------------------------------------------------------------------------
def bench_baseline(model_path: str, prompts: list[str], max_tokens: int) -> Run:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    eos = tok.eos_token_id
    with torch.no_grad():  # warm-up: the first call pays one-off costs that a server pays at start
        model.generate(**tok(prompts[0], return_tensors="pt"), max_new_tokens=4, pad_token_id=tok.pad_token_id)
    lat, total = [], 0
    t0 = time.perf_counter()
    for p in prompts:
        t = time.perf_counter()
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        total += len(new) - (1 if new and new[-1] == eos else 0)
        lat.append(time.perf_counter() - t)
    return Run("baseline: sequential generate", 1, False, len(prompts), total, time.perf_counter() - t0,
               _pct(lat, 0.5), _pct(lat, 0.99))  # fmt: skip


# 2. the engine alone ------------------------------------------------------------------------------------
def bench_engine(engine, prompts: list[str], max_tokens: int, concurrency: int, adapters: list[str | None],
                 label: str = "") -> Run:  # fmt: skip
    from aigc.serve.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0)

    async def main() -> Run:
        sem = asyncio.Semaphore(concurrency)
        lat: list[float] = []

        async def one(i: int, p: str) -> int:
            async with sem:
                t = time.perf_counter()
                out = await asyncio.wait_for(
                    engine.agenerate(p, params, adapter=adapters[i % len(adapters)]), TIMEOUT_S
                )
                lat.append(time.perf_counter() - t)
                return out.completion_tokens

        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        name = "engine alone" + (f", {len(adapters)} models mixed" if len(adapters) > 1 else "") + label
        return Run(name, concurrency, False, len(prompts), sum(tokens), time.perf_counter() - t0,
                   _pct(lat, 0.5), _pct(lat, 0.99))  # fmt: skip

    return asyncio.run(main())


# 3. through Serve -----------------------------------------------------------------------------------------
def bench_serve(base_url: str, prompts: list[str], max_tokens: int, concurrency: int, stream: bool,
                models: list[str]) -> Run:  # fmt: skip
    from openai import AsyncOpenAI

    async def main() -> Run:
        client = AsyncOpenAI(base_url=base_url, api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        sem = asyncio.Semaphore(concurrency)
        lat: list[float] = []
        ttft: list[float] = []

        async def one(i: int, p: str) -> int:
            kw = {"model": models[i % len(models)], "prompt": p, "max_tokens": max_tokens, "temperature": 0}
            async with sem:
                t = time.perf_counter()
                if not stream:
                    r = await client.completions.create(**kw)
                    lat.append(time.perf_counter() - t)
                    return r.usage.completion_tokens
                n, first = 0, None
                s = await client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
                async for chunk in s:
                    if first is None and chunk.choices and chunk.choices[0].text:
                        first = time.perf_counter() - t
                    if chunk.usage is not None:
                        n = chunk.usage.completion_tokens
                lat.append(time.perf_counter() - t)
                ttft.append(first if first is not None else lat[-1])
                return n

        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        secs = time.perf_counter() - t0
        await client.close()
        name = "serve" + (" stream" if stream else "") + (f", {len(models)} models mixed" if len(models) > 1 else "")
        return Run(name, concurrency, stream, len(prompts), sum(tokens), secs, _pct(lat, 0.5), _pct(lat, 0.99),
                   statistics.median(ttft) if ttft else None)  # fmt: skip

    return asyncio.run(main())


def _random_adapters(base: str, registry_dir: str, n: int) -> list[str]:
    """``n`` LoRA adapters with random weights (so they change outputs), registered as bench-<i>."""
    return [register_random_adapter(base, registry_dir, f"bench-{i}", seed=i) for i in range(n)]


def _load_adapters(engine, registry_dir: str, adapters: list[str]) -> list[str]:
    """Load the registered adapters into ``engine``; returns the engine's names for them."""
    from aigc.registry import Registry

    reg, names = Registry(registry_dir), []
    for mid in adapters:
        name = mid.replace(":", "_").replace("-", "_")
        engine.load_adapter(reg.resolve(mid).adapter_uri, name)
        names.append(name)
    return names


def _print(runs: list[Run], baseline: Run) -> None:
    print(f"\n{'run':<46}{'conc':>5}{'tok/s':>9}{'x base':>8}{'p50 s':>8}{'p99 s':>8}{'ttft p50':>10}")
    for r in runs:
        ttft = f"{r.ttft_p50_s:.3f}" if r.ttft_p50_s is not None else "-"
        print(f"{r.name:<46}{r.concurrency:>5}{r.tokens_per_s:>9.0f}{r.tokens_per_s / baseline.tokens_per_s:>8.2f}"
              f"{r.p50_s:>8.2f}{r.p99_s:>8.2f}{ttft:>10}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--skip-serve", action="store_true", help="baseline and engine only (no Ray)")
    ap.add_argument("--skip-peft-mix", action="store_true", help="no mixed run on peft's per-adapter split")
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--model-shape", choices=sorted(SHAPES), help="a random-weight model with this model's shapes")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="aigc-bench-serve-")
    shape = []
    if args.model_shape:
        path = build_shape(args.model_shape, os.path.join(tempfile.gettempdir(), f"aigc-shape-{args.model_shape}"))
        shape = [f"model.name_or_path={path}"]
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), [f"registry_dir={work}/registry",
                      f"serve.max_tokens_cap={max(args.max_tokens, 64)}", *shape, *args.set])  # fmt: skip
    prompts = _prompts(args.requests)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        baseline = pool.apply(bench_baseline, (cfg.model.name_or_path, prompts, args.max_tokens))
    runs = [baseline]
    torch.set_num_threads(max(1, int(cfg.serve.cpus_per_replica)))  # what Ray gives a generator replica
    print(f"[bench] {args.requests} requests, max_tokens {args.max_tokens}, greedy, model {cfg.model.name_or_path}, "
          f"engine torch threads {torch.get_num_threads()}, overrides {args.set or 'none'}")  # fmt: skip
    adapters = _random_adapters(cfg.model.name_or_path, cfg.registry_dir, 3)

    from aigc.serve.engine import GenerationEngine

    top = max(args.concurrency)
    mixed: dict[str, Run] = {}
    for batched in (True, False) if not args.skip_peft_mix else (True,):
        engine = GenerationEngine(cfg.model.name_or_path, dtype="float32", quantization=cfg.serve.quantization,
                                  batched_lora=batched)  # fmt: skip
        names = _load_adapters(engine, cfg.registry_dir, adapters)
        bench_engine(engine, prompts[:4], 4, 4, [None, *names])  # warm-up
        if batched:  # the single-model runs do not touch LoRA: once is enough
            for c in args.concurrency:
                runs.append(bench_engine(engine, prompts, args.max_tokens, c, [None]))
            single = runs[-1]
        label = ", batched LoRA" if batched else ", peft split"
        runs.append(bench_engine(engine, prompts, args.max_tokens, top, [None, *names], label))
        mixed[label] = runs[-1]
        engine.close()
        del engine

    serve_single = serve_mixed = None
    if not args.skip_serve:
        from ray import serve

        from aigc.cli import check_stage
        from aigc.cluster import init_ray
        from aigc.serve.run import run_server

        cfg = check_stage("serve", cfg)  # the checks `aigc serve` runs, before any Ray work
        init_ray(cfg.cluster.num_cpus)
        url = run_server(with_values(cfg, {"serve.autoscaling.max_replicas": 1}), blocking=False)
        try:
            from aigc.models.loading import model_id_for

            base_id = cfg.serve.base_model_id or model_id_for(cfg.model.name_or_path)
            bench_serve(url, prompts[:8], args.max_tokens, 8, False, [base_id, *adapters])  # warm-up: load adapters
            for stream in (False, True):
                for c in args.concurrency:
                    runs.append(bench_serve(url, prompts, args.max_tokens, c, stream, [base_id]))
                    if not stream and c == top:
                        serve_single = runs[-1]
            runs.append(bench_serve(url, prompts, args.max_tokens, top, False, [base_id, *adapters]))
            serve_mixed = runs[-1]
        finally:
            serve.shutdown()

    _print(runs, baseline)
    print(f"\nmixed (base + {len(adapters)} adapters) / single model, tokens/s at concurrency {top} (target >= 0.85):")
    for label, r in mixed.items():
        print(f"  engine{label}: {r.tokens_per_s / single.tokens_per_s:.2f}x")
    if serve_single is not None:
        print(f"  serve, batched LoRA: {serve_mixed.tokens_per_s / serve_single.tokens_per_s:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in runs], f, indent=1)


if __name__ == "__main__":
    main()

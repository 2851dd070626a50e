"""Batch generation throughput: ``aigc generate`` against a sequential ``generate`` loop and the served endpoint.

    .venv/bin/python bench/batch_generate.py [--prompts 2000] [--max-tokens 32] [--concurrency 32]
                                             [--actors 1] [--batch-size 32] [--model-shape SmolLM2-135M]
                                             [--baseline-prompts 200] [--set generate.actors=2 ...]

The same prompts (held-out demo questions as raw completion prompts, greedy, ``--max-tokens`` each), in the same
run, on the same cores:

1. baseline: one fresh process calling ``model.generate`` for one prompt after another (``serve_throughput.py``'s
   baseline); ``--baseline-prompts N`` times it on the first N prompts only (its figure is a rate: on a large
   model shape, 2,000 sequential prompts would take most of an hour);
2. ``aigc generate`` (:func:`aigc.batch.run_generate`, ``generate.format: text``): the engine on a Ray Data actor
   pool, timed from the call to the merged output (actor start and model load included);
3. the Serve app (``aigc serve``, one generator replica) with ``--concurrency`` callers through the ``openai``
   async client (``serve_throughput.py``'s load loop).

Target: ``aigc generate`` >= the endpoint's throughput. Prints output tokens/s of each and the ratios.
``--model-shape`` uses a random-weight model with a real model's shapes (``bench/_shapes.py``, no download).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from _shapes import SHAPES, build_shape  # noqa: E402  (bench/ is on the path: the script's folder)
from serve_throughput import Run, _prompts, bench_baseline, bench_serve  # noqa: E402

from aigc.config import load_config, with_values  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def bench_generate(cfg, input_path: str, output: str) -> Run:
    from aigc.batch import run_generate

    t0 = time.perf_counter()
    result = run_generate(cfg, output=output)
    secs = time.perf_counter() - t0
    name = f"aigc generate ({cfg.generate.actors} actor(s), batch {cfg.generate.batch_size})"
    return Run(name, cfg.generate.batch_size, False, result.rows, result.completion_tokens, secs, secs, secs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=32, help="callers of the served endpoint")
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--baseline-prompts",
        type=int,
        default=0,
        help="the sequential baseline on the first N prompts only (0: all; its figure is a rate)",
    )
    ap.add_argument("--skip-serve", action="store_true", help="baseline and aigc generate only")
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--model-shape", choices=sorted(SHAPES), help="a random-weight model with this model's shapes")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="aigc-bench-batch-")
    shape = []
    if args.model_shape:
        path = build_shape(args.model_shape, os.path.join(tempfile.gettempdir(), f"aigc-shape-{args.model_shape}"))
        shape = [f"model.name_or_path={path}"]
    prompts = _prompts(args.prompts)
    input_path = os.path.join(work, "prompts.jsonl")
    with open(input_path, "w") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in prompts)
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), [
        f"output_dir={work}/run", f"registry_dir={work}/registry", f"serve.max_tokens_cap={max(args.max_tokens, 64)}",
        f"generate.input={input_path}", "generate.format=text", f"generate.max_tokens={args.max_tokens}",
        "generate.temperature=0", f"generate.actors={args.actors}", f"generate.batch_size={args.batch_size}",
        *shape, *args.set])  # fmt: skip
    print(f"[bench] {len(prompts)} prompts, max_tokens {args.max_tokens}, greedy, model {cfg.model.name_or_path}")

    # 1. the sequential baseline, in a fresh process
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        sample = prompts[: args.baseline_prompts] if args.baseline_prompts else prompts
        baseline = pool.apply(bench_baseline, (cfg.model.name_or_path, sample, args.max_tokens))
    runs = [baseline]

    from aigc.cli import check_stage
    from aigc.cluster import init_ray

    # 2. aigc generate, on the cluster both candidates share
    cfg = check_stage("generate", cfg)
    init_ray(cfg.cluster.num_cpus)
    batch = bench_generate(cfg, input_path, os.path.join(work, "generate"))
    runs.append(batch)

    # 3. the served endpoint under concurrent callers
    served = None
    if not args.skip_serve:
        from ray import serve

        from aigc.models.loading import model_id_for
        from aigc.serve.run import run_server

        cfg = check_stage("serve", cfg)
        url = run_server(with_values(cfg, {"serve.autoscaling.max_replicas": 1}), blocking=False)
        try:
            base_id = cfg.serve.base_model_id or model_id_for(cfg.model.name_or_path)
            bench_serve(url, prompts[:4], args.max_tokens, 4, False, [base_id])  # warm-up
            served = bench_serve(url, prompts, args.max_tokens, args.concurrency, False, [base_id])
            runs.append(served)
        finally:
            serve.shutdown()

    print(f"\n{'run':<46}{'tok/s':>9}{'seconds':>9}")
    for r in runs:
        print(f"{r.name:<46}{r.tokens_per_s:>9.0f}{r.seconds:>9.1f}")
    print(f"\naigc generate / sequential generate: {batch.tokens_per_s / baseline.tokens_per_s:.2f}x")
    if served is not None:
        print(f"aigc generate / served endpoint at {args.concurrency} callers: "
              f"{batch.tokens_per_s / served.tokens_per_s:.2f}x (target >= 1)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**r.__dict__, "tokens_per_s": r.tokens_per_s} for r in runs], f, indent=1)


if __name__ == "__main__":
    main()

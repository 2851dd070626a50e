"""Constrained decoding backends: what one row's token mask costs per step, xgrammar against llguidance.

    .venv/bin/python bench/grammar_backends.py [--rows 16] [--steps 64] [--model-shape SmolLM2-135M]
    (llguidance is not a dependency: pip install llguidance to include it; it is skipped when absent)

On this engine's tokenizer (the demo tokenizer; ``--model-shape`` widens the vocabulary to that model's logits,
as the engine does, ``bench/_shapes.py``), for each backend and each schema: the time to compile the grammar
once, then ``--rows`` random walks of up to ``--steps`` tokens. At each step the backend fills the row's token
bitmask (timed: the per-step cost the engine pays per constrained row), the mask is applied to random logits
and a token is sampled from what is left, and the matcher advances with it (timed too). Walks are seeded: each
backend sees the same random logits; the tokens differ only where the two grammars differ.

Prints per backend and schema: compile ms (llguidance builds most of its parser lazily, as matchers are made and
used: compare the fill figures), mask fill us/step (mean, p99), advance us/step, and steps walked.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from _shapes import SHAPES, TINY  # noqa: E402  (bench/ is on the path: the script's folder)

from aigc.models.loading import load_tokenizer  # noqa: E402
from aigc.serve.engine.grammar import Grammars, parse_response_format  # noqa: E402

SCHEMAS: dict[str, dict[str, Any]] = {
    "object": {"type": "object"},
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "maxLength": 12},
            "status": {"enum": ["shipped", "late", "lost"]},
            "items": {"type": "array", "items": {"type": "object", "properties": {
                "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}, "required": ["sku", "qty"]}},
            "note": {"type": "string"},
        },
        "required": ["id", "status", "items"],
    },
}  # fmt: skip


class Backend:
    """One backend: ``compile(schema)`` -> grammar, ``matcher(grammar)``, ``fill(matcher, bitmask)``, ``advance``."""

    name: str
    compile: Callable[[dict], Any]
    matcher: Callable[[Any], Any]
    fill: Callable[[Any, torch.Tensor], None]
    advance: Callable[[Any, int], bool]
    done: Callable[[Any], bool]


def _xgrammar(tokenizer: Any, vocab: int, eos: int) -> Backend:
    grammars = Grammars(tokenizer, vocab, [eos])
    b = Backend()
    b.name = "xgrammar"
    b.compile = lambda schema: grammars.compile(
        parse_response_format({"type": "json_schema", "json_schema": {"name": "b", "schema": schema}})
    )
    b.matcher = Grammars.matcher
    b.fill = lambda m, bitmask: m.fill_next_token_bitmask(bitmask, 0)
    b.advance = lambda m, token: m.accept_token(token)
    b.done = lambda m: m.is_terminated()
    return b


def _llguidance(tokenizer: Any, vocab: int, eos: int) -> Backend | None:
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        print("[bench] llguidance is not installed: skipped (pip install llguidance)")
        return None
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)
    fixed = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # as the engine's grammar
    b = Backend()
    b.name = "llguidance"
    b.compile = lambda schema: llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=fixed)
    b.matcher = lambda grammar: llguidance.LLMatcher(lltok, grammar)
    b.fill = lambda m, bitmask: llguidance.torch.fill_next_token_bitmask(m, bitmask, 0)
    b.advance = lambda m, token: m.consume_token(token)
    b.done = lambda m: m.is_stopped()
    return b


def _walk(b: Backend, grammar: Any, vocab: int, steps: int, seed: int) -> tuple[list[float], list[float]]:
    """One seeded random walk; returns the fill and advance times (seconds) of each step."""
    from xgrammar import allocate_token_bitmask, apply_token_bitmask_inplace

    gen = torch.Generator().manual_seed(seed)
    m, bitmask = b.matcher(grammar), allocate_token_bitmask(1, vocab)
    fills, advances = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        b.fill(m, bitmask)
        t1 = time.perf_counter()
        logits = torch.randn(1, vocab, generator=gen)
        apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab)
        if not torch.isfinite(logits).any():
            break
        token = int(torch.multinomial(torch.softmax(logits[0], -1), 1, generator=gen))
        t2 = time.perf_counter()
        ok = b.advance(m, token)
        fills.append(t1 - t0)
        advances.append(time.perf_counter() - t2)
        if not ok or b.done(m):
            break
    return fills, advances


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16, help="random walks per backend and schema")
    ap.add_argument("--steps", type=int, default=64, help="tokens per walk at most")
    ap.add_argument("--model-shape", choices=sorted(SHAPES), help="widen the vocabulary to this model's logits")
    args = ap.parse_args()

    tokenizer = load_tokenizer(TINY)
    vocab = SHAPES[args.model_shape]["vocab_size"] if args.model_shape else len(tokenizer)
    eos = int(tokenizer.eos_token_id)
    backends = [b for b in (_xgrammar(tokenizer, vocab, eos), _llguidance(tokenizer, vocab, eos)) if b is not None]
    print(f"[bench] vocabulary {vocab} ({args.model_shape or 'demo tokenizer'}), {args.rows} walks x {args.steps}")
    head = f"{'backend':<11} {'schema':<7} {'compile ms':>10} {'fill us':>8} {'fill p99':>8}"
    print(f"{head} {'advance us':>10} {'steps':>6}")
    for b in backends:
        for name, schema in SCHEMAS.items():
            t = time.perf_counter()
            grammar = b.compile(json.loads(json.dumps(schema)))
            compile_ms = (time.perf_counter() - t) * 1e3
            fills, advances = [], []
            for seed in range(args.rows):
                f, a = _walk(b, grammar, vocab, args.steps, seed)
                fills += f
                advances += a
            p99 = sorted(fills)[min(len(fills) - 1, int(0.99 * len(fills)))]
            print(f"{b.name:<11} {name:<7} {compile_ms:>10.2f} {statistics.mean(fills) * 1e6:>8.1f} "
                  f"{p99 * 1e6:>8.1f} {statistics.mean(advances) * 1e6:>10.1f} {len(fills):>6}")  # fmt: skip


if __name__ == "__main__":
    main()

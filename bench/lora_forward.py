"""One decoding step of a 32-row batch: rows on the base model and 3 LoRA adapters against the base model alone.

    PYTHONPATH=platform .venv/bin/python bench/lora_forward.py [--model-shape SmolLM2-135M] [--rows 32]
                                                              [--steps 20] [--repeats 3] [--threads 2]

One process, no Ray, the engine's own batch (:class:`aigc.serve.engine.batch.RunningBatch`) on a float32 model:
the tiny demo model, or with ``--model-shape`` a random-weight model with a real model's shapes
(``bench/_shapes.py``). Three random adapters of ranks 8, 16 and 8 (the last with rslora) on every linear layer,
loaded the way the engine loads them. Each case prefills ``--rows`` prompts of 32 tokens and times
``--steps`` decoding steps (best of ``--repeats``); the cases, interleaved so load on the machine hits them
alike:

1. baseline: every row on the base model (no LoRA work at all);
2. every row on one adapter, batched LoRA;
3. rows on the base model and the 3 adapters in turn, peft's mixed-adapter forward (split per adapter);
4. the same mix, batched LoRA (masked product, :mod:`aigc.serve.engine.lora_batch`);
5. the same mix, batched LoRA forced to gather each row's weights (``bmm``, what many adapters use).

Before timing, the mixed cases' logits are checked equal (atol 1e-3) to peft's. Prints ms per step and each
case's ratio of steps/s to the baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import torch

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))  # PYTHONPATH wins

from _adapters import random_adapter_dir  # noqa: E402  (bench/ is on the path: the script's folder)
from _shapes import SHAPES, build_shape  # noqa: E402

from aigc.serve.engine import lora_batch  # noqa: E402
from aigc.serve.engine.adapters import BASE_ADAPTER, PLACEHOLDER, AdapterSet  # noqa: E402
from aigc.serve.engine.batch import Row, RunningBatch  # noqa: E402
from aigc.serve.engine.lora_batch import LoraForward  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ADAPTERS = {"a0": {"r": 8, "lora_alpha": 16}, "a1": {"r": 16, "lora_alpha": 16}, "a2": {"r": 8, "use_rslora": True}}


def _model(path: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=1, target_modules=["q_proj"]), adapter_name=PLACEHOLDER).eval()
    batched, peft = LoraForward(model), LoraForward(model, batched=False)
    adapters = AdapterSet(model, threading.Lock(), on_change=batched.reset)
    for i, (name, lora) in enumerate(ADAPTERS.items()):
        adapters.load(random_adapter_dir(path, name, seed=i, **lora), name)
    return model, batched, peft


def _steps(model, lora: LoraForward, adapters: list[str], steps: int, gathered: bool = False) -> tuple[float, list]:
    """Seconds for ``steps`` decoding steps of one row per entry of ``adapters``, and the first step's logits."""
    old = lora_batch.MASKED_MAX_RANK
    lora_batch.MASKED_MAX_RANK = 0 if gathered else old
    try:
        batch = RunningBatch(model, pad_id=0, lora=lora)
        gen = torch.Generator().manual_seed(0)
        rows = [Row(prompt_ids=torch.randint(5, 300, (32,), generator=gen).tolist(), adapter=a) for a in adapters]
        pre = batch.prefill(rows)
        batch.join(pre)
        logits = pre.logits
        for r, t in zip(rows, logits.argmax(-1).tolist(), strict=True):
            r.tokens.append(t)
        first = batch.decode()
        t0 = time.perf_counter()
        logits = first
        for _ in range(steps):
            for r, t in zip(batch.rows, logits.argmax(-1).tolist(), strict=True):
                r.tokens.append(t)
            logits = batch.decode()
        return time.perf_counter() - t0, first
    finally:
        lora_batch.MASKED_MAX_RANK = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-shape", choices=sorted(SHAPES), help="a random-weight model with this model's shapes")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (a generator replica's CPUs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    path = os.path.join(ROOT, "assets", "tiny-base")
    if args.model_shape:
        path = build_shape(args.model_shape, os.path.join(tempfile.gettempdir(), f"aigc-shape-{args.model_shape}"))
    model, batched, peft = _model(path)
    mix = [([BASE_ADAPTER, *ADAPTERS])[i % (len(ADAPTERS) + 1)] for i in range(args.rows)]
    cases = {
        "baseline: every row on the base model": (batched, [BASE_ADAPTER] * args.rows, False),
        "every row on one adapter, batched": (batched, ["a1"] * args.rows, False),
        "base + 3 adapters, peft split": (peft, mix, False),
        "base + 3 adapters, batched (masked)": (batched, mix, False),
        "base + 3 adapters, batched (gathered)": (batched, mix, True),
    }
    with torch.inference_mode():
        _, want = _steps(model, peft, mix, 0)
        for name in list(cases)[3:]:
            _, got = _steps(model, *cases[name][:2], 0, gathered=cases[name][2])
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
        best = dict.fromkeys(cases, float("inf"))
        for _ in range(args.repeats):
            for name, (lora, adapters, gathered) in cases.items():
                best[name] = min(best[name], _steps(model, lora, adapters, args.steps, gathered)[0])
    print(f"[bench] {path}, {args.rows} rows, {args.steps} decoding steps, best of {args.repeats}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    base = best[next(iter(cases))]
    print(f"{'case':<42}{'ms/step':>9}{'x base':>8}")
    for name, secs in best.items():
        print(f"{name:<42}{1000 * secs / args.steps:>9.2f}{base / secs:>8.2f}")


if __name__ == "__main__":
    main()

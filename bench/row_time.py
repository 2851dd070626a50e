"""Row time of the preprocessing row work with one template rendering per row against the prefix renderings.

    PYTHONPATH=platform .venv/bin/python bench/row_time.py [--rows 3000] [--repeats 3]

One process, no Ray: `aigc.data.tokenizing.Tokenize` (validate, chat template, tokenize, length policy, split)
on batches of 1,024 rows, each case timed with `render_for_training` (one rendering where the template allows
it) and with `render_by_prefixes` (two renderings per assistant turn: the code before), alternating, best of
`--repeats`. The cases: generated support rows (alpaca, one exchange) and multi-turn conversations (messages,
2-4 exchanges built from the same rows), on the tiny model's tokenizer with its own (default) template and
with a ChatML template. The outputs of both paths are checked equal before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))  # PYTHONPATH wins

import aigc.data.templates as templates  # noqa: E402
from aigc.config import DataConfig, ModelConfig  # noqa: E402
from aigc.data.tokenizing import Tokenize  # noqa: E402
from aigc.data.turn_spans import CHATML_TEMPLATE  # noqa: E402
from aigc.demo.dataset import generate_support_examples  # noqa: E402
from aigc.models.loading import load_tokenizer  # noqa: E402

_TINY = Path(__file__).resolve().parents[1] / "assets" / "tiny-base"
_BATCH = 1024
_ONE_RENDER = templates.render_for_training


def _chatml_tokenizer(out: Path) -> str:
    shutil.copytree(_TINY, out, ignore=shutil.ignore_patterns("*.safetensors", "chat_template.jinja"))
    tok = load_tokenizer(str(out))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>"})
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    return str(out)


def _cases(n: int) -> dict[str, tuple[str, np.ndarray]]:
    rows = generate_support_examples(n, seed=1)
    rng = random.Random(1)
    convos = []
    for i in range(n):
        turns = [{"role": "system", "content": "You are the shop's support agent."}]
        for j in range(rng.randint(2, 4)):
            r = rows[(i + j * 7) % n]
            turns += [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        convos.append({"messages": turns})
    as_raw = lambda rs: np.array([json.dumps(r, ensure_ascii=False) for r in rs], dtype=object)  # noqa: E731
    return {"support (alpaca, 1 exchange)": ("alpaca", as_raw(rows)),
            "multi-turn (messages, 2-4 exchanges)": ("messages", as_raw(convos))}  # fmt: skip


def _run(tk: Tokenize, raw: np.ndarray, one_render: bool) -> tuple[float, list]:
    templates.render_for_training = _ONE_RENDER if one_render else templates.render_by_prefixes
    try:
        t0 = time.perf_counter()
        tables = [tk({"raw": raw[i : i + _BATCH]}) for i in range(0, len(raw), _BATCH)]
        return time.perf_counter() - t0, tables
    finally:
        templates.render_for_training = _ONE_RENDER


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = {"tiny, default template": str(_TINY), "tiny, ChatML": _chatml_tokenizer(Path(tmp) / "chatml")}
        print(f"{'tokenizer':<24} {'rows':<38} {'prefixes µs/row':>16} {'one render µs/row':>18} {'speed-up':>9}")
        for tname, path in tokenizers.items():
            for cname, (fmt, raw) in _cases(args.rows).items():
                tk = Tokenize(ModelConfig(name_or_path=path), DataConfig(format=fmt))
                old, new = _run(tk, raw, False), _run(tk, raw, True)
                assert [t.to_pylist() for t in old[1]] == [t.to_pylist() for t in new[1]], "outputs differ"
                t_old, t_new = [old[0]], [new[0]]
                for _ in range(args.repeats - 1):
                    t_old.append(_run(tk, raw, False)[0])
                    t_new.append(_run(tk, raw, True)[0])
                a, b = min(t_old) / len(raw) * 1e6, min(t_new) / len(raw) * 1e6
                print(f"{tname:<24} {cname:<38} {a:>16.1f} {b:>18.1f} {a / b:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()

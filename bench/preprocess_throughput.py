"""Preprocessing throughput: the Ray Data job against a single-process loop over the same rows.

    .venv/bin/python bench/preprocess_throughput.py [--rows 20000] [--actors 2]

Baseline: one Python process that validates, templates and tokenizes every row with the same code
(`aigc.data.preprocess._Tokenize`) and writes one Parquet file. Candidate: `aigc.data.preprocess.preprocess`
on an embedded Ray cluster (read -> actor pool of `--actors` tokenizers -> split -> Parquet shards + stats).
Prints rows/s of both and the ratio. Both measured in the same run on the same input file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from aigc.config import load_config  # noqa: E402
from aigc.data.preprocess import _Tokenize, preprocess  # noqa: E402
from aigc.demo.dataset import generate_support_examples  # noqa: E402


def _baseline(cfg, path: str, out: str) -> float:
    t0 = time.perf_counter()
    tok = _Tokenize(cfg.model.model_dump(), cfg.data.model_dump())
    with open(path) as f:
        lines = np.array([line.rstrip("\n") for line in f if line.strip()], dtype=object)
    tables = [tok({"raw": lines[i : i + 256]}) for i in range(0, len(lines), 256)]
    import pyarrow as pa

    pq.write_table(pa.concat_tables(tables), os.path.join(out, "baseline.parquet"))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--actors", type=int, default=2)
    args = ap.parse_args()

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "rows.jsonl")
        with open(src, "w") as f:
            for r in generate_support_examples(args.rows, seed=3):
                f.write(json.dumps(r) + "\n")
        cfg = load_config("configs/demo.yaml", [f"data.path={src}", f"output_dir={tmp}/out",
                                                f"data.tokenizer_actors={args.actors}"])  # fmt: skip
        base_s = _baseline(cfg, src, tmp)
        ray.init(num_cpus=os.cpu_count(), logging_level="ERROR")
        preprocess(cfg.data, cfg.model, cfg.output_dir)  # warm-up: worker processes, actor imports
        t0 = time.perf_counter()
        res = preprocess(cfg.data, cfg.model, cfg.output_dir)
        ray_s = time.perf_counter() - t0
        ray.shutdown()
    assert res.stats["rows_kept"] == args.rows
    print(f"rows: {args.rows}, cores: {os.cpu_count()}, tokenizer actors: {args.actors}")
    print(f"baseline single process : {base_s:7.2f}s  {args.rows / base_s:9.0f} rows/s")
    print(f"Ray Data job (warm)     : {ray_s:7.2f}s  {args.rows / ray_s:9.0f} rows/s")
    print(f"ratio (Ray Data / baseline throughput): {base_s / ray_s:.2f}x")


if __name__ == "__main__":
    main()

"""Preprocessing throughput: `aigc preprocess` against Hugging Face `datasets` and a single-process loop.

    PYTHONPATH=platform .venv/bin/python bench/preprocess_throughput.py [--rows 50000,500000] [--actors N]
                                                                        [--warm] [--platform-only]

All on one generated input file (customer-support rows, alpaca format), in one run, each doing the same row
work (`aigc.data.tokenizing.Tokenize`: validate, chat template, tokenize, length policy, split):

- single process: one Python process, batches of 1,024 rows, one Parquet file;
- `datasets`: `Dataset.from_json(file).map(<row work>, batched=True, num_proc=<cores>)` + `to_parquet`
  (the rows are serialized back to the JSON strings the row work takes, inside the mapped function);
- platform, cold: `python -m aigc.cli preprocess` as a user runs it (Ray start-up included); the peak RSS of
  its driver process and the CPU seconds of every process of its tree (Ray's included) are sampled every 0.5 s;
- platform, warm (`--warm`): `preprocess()` again on the same embedded cluster (workers and imports warm).

Prints seconds and rows/s of each, the platform's throughput as a multiple of the others, and for several
row counts how the driver's peak RSS grows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))  # PYTHONPATH wins

from _procs import TreeSampler  # noqa: E402  (bench/ is on the path: the script's folder)

from aigc.cli import check_stage  # noqa: E402
from aigc.config import load_config  # noqa: E402
from aigc.data.preprocess import preprocess, read_stats  # noqa: E402
from aigc.data.tokenizing import Tokenize as _Tokenize  # noqa: E402
from aigc.demo.dataset import generate_support_examples  # noqa: E402

_BATCH = 1024
_WORKER: dict[int, _Tokenize] = {}  # one row-work object per `datasets` worker process


def _single_process(cfg, path: str, out: str) -> float:
    t0 = time.perf_counter()
    tok = _Tokenize(cfg.model, cfg.data)
    with open(path) as f:
        lines = np.array([line.rstrip("\n") for line in f if line.strip()], dtype=object)
    tables = [tok({"raw": lines[i : i + _BATCH]}) for i in range(0, len(lines), _BATCH)]
    pq.write_table(pa.concat_tables(tables), os.path.join(out, "single.parquet"))
    return time.perf_counter() - t0


def _row_work(batch: pa.Table, model: Any, data: Any) -> pa.Table:
    tok = _WORKER.get(os.getpid())
    if tok is None:
        tok = _WORKER[os.getpid()] = _Tokenize(model, data)
    raw = np.array([json.dumps(r, ensure_ascii=False) for r in batch.to_pylist()], dtype=object)
    return tok({"raw": raw})


def _datasets(cfg, path: str, out: str, procs: int) -> float:
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    t0 = time.perf_counter()
    ds = Dataset.from_json(path, cache_dir=os.path.join(out, "hf-cache")).with_format("arrow")
    ds = ds.map(_row_work, batched=True, batch_size=_BATCH, num_proc=procs, remove_columns=ds.column_names,
                fn_kwargs={"model": cfg.model, "data": cfg.data})  # fmt: skip
    ds.to_parquet(os.path.join(out, "datasets.parquet"))
    return time.perf_counter() - t0


def _cli(overrides: list[str], config: str) -> tuple[float, int, dict[str, float]]:
    """Seconds, the peak RSS (bytes) of the CLI's own process, and CPU seconds by process over its whole tree
    (the embedded Ray cluster's processes included)."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "aigc.cli", "preprocess", "--config", config, *overrides],
                         stdout=subprocess.DEVNULL)  # fmt: skip
    sampler = TreeSampler(p.pid).start()
    rc = p.wait()
    seconds = time.perf_counter() - t0
    sampler.stop()
    if rc != 0:
        raise SystemExit(f"aigc preprocess failed (exit {rc})")
    return seconds, sampler.peak["root_rss"], sampler.cpu_by_title()


def _run(n: int, args: argparse.Namespace, cores: int) -> dict[str, float]:
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "rows.jsonl")
        with open(src, "w") as f:
            for r in generate_support_examples(n, seed=3):
                f.write(json.dumps(r) + "\n")
        overrides = [f"data.path={src}", f"output_dir={tmp}/out"]
        overrides += [f"data.tokenizer_actors={args.actors}"] if args.actors else []
        cfg = check_stage("preprocess", load_config(args.config, overrides))  # before any Ray work
        out = {}
        if not args.platform_only:
            out = {"single": _single_process(cfg, src, tmp), "datasets": _datasets(cfg, src, tmp, cores)}
        out["cold"], out["rss"], cpu = _cli(overrides, args.config)
        stats = read_stats(os.path.join(tmp, "out"))
        assert stats["rows_in"] == n, stats
        out["job"] = stats["seconds"]  # the job itself; the rest of the cold run is start-up and shutdown
        if args.warm:
            ray.init(num_cpus=cores, logging_level="ERROR")
            preprocess(cfg.data, cfg.model, cfg.output_dir)  # warm-up: worker processes, actor imports
            t0 = time.perf_counter()
            preprocess(cfg.data, cfg.model, cfg.output_dir)
            out["warm"] = time.perf_counter() - t0
            ray.shutdown()
    print(f"rows: {n}, cores: {cores}, tokenizer actors: {args.actors or 'cluster CPUs'}")
    names = [("single process", "single"), (f"datasets map num_proc={cores}", "datasets"),
             ("aigc preprocess (cold CLI)", "cold"), ("aigc preprocess (warm)", "warm")]  # fmt: skip
    for name, key in names:
        if key in out:
            print(f"  {name:28s}: {out[key]:7.2f}s  {n / out[key]:9.0f} rows/s")
    for name, key in [("cold CLI", "cold"), ("warm", "warm")]:
        if key in out and "single" in out:
            print(f"  platform {name}: {out['single'] / out[key]:.2f}x single process, "
                  f"{out['datasets'] / out[key]:.2f}x datasets")  # fmt: skip
    print(f"  of the cold CLI: job {out['job']:.2f}s, start-up and shutdown {out['cold'] - out['job']:.2f}s")
    print(f"  driver peak RSS (cold CLI): {out['rss'] / 2**20:.0f} MiB")
    top = ", ".join(f"{k} {v:.1f}" for k, v in list(cpu.items())[:10])
    print(f"  CPU seconds by process (cold CLI, {sum(cpu.values()):.1f} in all): {top}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="20000", help="comma-separated row counts, e.g. 50000,500000")
    ap.add_argument("--actors", type=int, default=None, help="data.tokenizer_actors (default: CPUs minus one)")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--warm", action="store_true", help="also time a second run on a warm embedded cluster")
    ap.add_argument("--platform-only", action="store_true", help="no baselines: for trying settings, not for ratios")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    runs = {int(n): _run(int(n), args, cores) for n in args.rows.split(",")}
    if len(runs) > 1:
        (n0, first), (n1, last) = min(runs.items()), max(runs.items())
        print(f"driver peak RSS at {n1} rows / at {n0} rows: {last['rss'] / first['rss']:.2f}x")


if __name__ == "__main__":
    main()

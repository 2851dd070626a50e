"""Training throughput: `aigc train` (Ray Train, DDP on CPU) against a plain single-process PyTorch + peft loop.

    PYTHONPATH=platform nice -n 10 .venv/bin/python bench/train_throughput.py [--epochs 1] [--rows 400]
                                                                            [--model-shape SmolLM2-135M]

All on the demo data (the first ``--rows`` rows of ``assets/demo-data/support.jsonl``), preprocessed once with
``aigc preprocess`` (no val split, so no run spends time on eval); every run trains LoRA on the same model
(``model.name_or_path``, the tiny base; ``--model-shape``: a random-weight model with a real model's layer
shapes, ``bench/_shapes.py``, no download, so compute dominates as for users' models), the same train shards
and the same global batch (``train.batch_size`` x ``train.num_workers`` of the config):

- baseline: one process, torch threads = cores, the shards read with pyarrow, right-padded batches, AdamW with
  the config's schedule and clipping; and the same with one torch thread (on a small model and a busy
  machine, threads waiting on each other can cost more than they gain);
- platform, 1 worker: ``run_training`` with ``train.num_workers=1``, ``cpus_per_worker`` = cores;
- platform, N workers: ``run_training`` with the config's workers (the demo's 2, one CPU each).

Each run is its own process (started cold: imports, Ray start-up and shutdown are in its wall time). Tokens are
the non-padding tokens of the train shards times the epochs; tokens/s divides them by the summed
``epoch_time_s`` (training steps and the data feeding them; not model loading, eval or checkpoints). The run's
whole process tree (the embedded Ray cluster's processes included) is sampled every 0.5 s: RSS and CPU seconds
by process; PSS (shared pages split between processes), which costs ~10x more to read, every 5 s. Figures taken
before 2026-12-07 sampled PSS every 0.3 s, which took ~30% of a core from the platform runs (bench/_procs.py).

Prints a table and the platform's tokens/s as a multiple of the baseline's; writes the figures to
``runs/bench/train_throughput-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.append(os.path.join(ROOT, "platform"))  # PYTHONPATH wins

from _procs import TreeSampler  # noqa: E402  (bench/ is on the path: the script's folder)
from _shapes import SHAPES, build_shape  # noqa: E402

DEMO_DATA = os.path.join(ROOT, "assets", "demo-data", "support.jsonl")


# ---------------------------------------------------------------- the runs (each in a child process)


def _load(spec: dict):
    from aigc.config import load_config

    return load_config(spec["config"], spec["overrides"])


def _baseline(spec: dict) -> dict:
    """A plain loop: transformers + peft, one process, every core."""
    import pyarrow.parquet as pq
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    from aigc import storage
    from aigc.data.preprocess import shards_dir

    torch.set_num_threads(spec["cores"])
    cfg = _load(spec)
    tc, lo = cfg.train, cfg.lora
    torch.manual_seed(tc.seed)
    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                                             target_modules=lo.target_modules, task_type="CAUSAL_LM"))  # fmt: skip
    model.train()
    files = storage.list_files(storage.join(shards_dir(cfg.output_dir), "train"))
    rows = [pq.read_table(f, columns=["input_ids", "labels"]).to_pydict() for f in files if f.endswith(".parquet")]
    ids = [x for r in rows for x in r["input_ids"]]
    labels = [y for r in rows for y in r["labels"]]
    batch = tc.batch_size * tc.num_workers
    steps_per_epoch = -(-len(ids) // batch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    total = tc.epochs * steps_per_epoch
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(tc.warmup_ratio * total), total)

    history = []
    for epoch in range(tc.epochs):
        t0, tokens, loss_sum = time.perf_counter(), 0, 0.0
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(tc.seed + epoch)).tolist()
        for s in range(0, len(order), batch):
            picked = order[s : s + batch]
            width = max(len(ids[i]) for i in picked)
            x = torch.full((len(picked), width), tok.pad_token_id, dtype=torch.long)
            y = torch.full((len(picked), width), -100, dtype=torch.long)
            mask = torch.zeros((len(picked), width), dtype=torch.long)
            for row, i in enumerate(picked):
                n = len(ids[i])
                x[row, :n], y[row, :n], mask[row, :n] = torch.tensor(ids[i]), torch.tensor(labels[i]), 1
            loss = model(input_ids=x, attention_mask=mask, labels=y, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens, loss_sum = tokens + int(mask.sum()), loss_sum + float(loss.detach())
        elapsed = time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "epoch_time_s": elapsed, "tokens": tokens,
                        "train_loss": loss_sum / steps_per_epoch})  # fmt: skip
    return {"history": history}


def _platform(spec: dict) -> dict:
    """``run_training`` on an embedded Ray cluster, as ``aigc train`` runs it (nothing registered)."""
    from aigc.cli import check_stage
    from aigc.cluster import init_ray
    from aigc.train.trainer import run_training

    cfg = check_stage("train", _load(spec))  # the checks `aigc train` runs, before any Ray work
    init_ray(cfg.cluster.num_cpus)
    t0 = time.perf_counter()
    result = run_training(cfg, register=False)
    fit_s = time.perf_counter() - t0
    keep = ("epoch", "epoch_time_s", "train_tokens_per_s", "train_loss")
    return {"history": [{k: h[k] for k in keep if k in h} for h in result.history], "fit_s": fit_s}


def _child(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    out = _baseline(spec) if spec["kind"] == "baseline" else _platform(spec)
    with open(spec["result"], "w") as f:
        json.dump(out, f)


# ---------------------------------------------------------------- the driver


def _run(kind: str, overrides: list[str], args: argparse.Namespace, tmp: str, cores: int) -> dict:
    name = f"{kind}-{len(os.listdir(tmp))}"
    spec = {"kind": kind, "config": args.config, "overrides": overrides, "cores": cores,
            "result": os.path.join(tmp, f"{name}.json")}  # fmt: skip
    spec_path = os.path.join(tmp, f"{name}.spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    log = os.path.join(tmp, f"{name}.log")
    t0 = time.perf_counter()
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", spec_path], stdout=out,
                             stderr=subprocess.STDOUT)  # fmt: skip
        sampler = TreeSampler(p.pid, pss_interval=5.0).start()
        rc = p.wait()
    wall = time.perf_counter() - t0
    sampler.stop()
    if rc != 0:
        with open(log) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"{kind} run failed (exit {rc}); the end of its output:\n{tail}")
    with open(spec["result"]) as f:
        result = json.load(f)
    return {**result, "wall_s": wall, "peak_rss_bytes": sampler.peak["rss"], "peak_pss_bytes": sampler.peak["pss"],
            "cpu_s_by_process": sampler.cpu_by_title()}  # fmt: skip


def _train_tokens(output_dir: str) -> int:
    """Non-padding tokens of the train shards (one epoch)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from aigc import storage
    from aigc.data.preprocess import shards_dir

    files = [f for f in storage.list_files(storage.join(shards_dir(output_dir), "train")) if f.endswith(".parquet")]
    return sum(int(pc.sum(pc.list_value_length(pq.read_table(f, columns=["input_ids"])["input_ids"])).as_py())
               for f in files)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rows", type=int, default=400, help="first N rows of the demo data (0: all 2,008)")
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    ap.add_argument(
        "--out", default=os.path.normpath(os.path.join(ROOT, "runs", "bench")), help="where the JSON of figures goes"
    )
    ap.add_argument("--model-shape", choices=sorted(SHAPES), help="a random-weight model with this model's shapes")
    ap.add_argument("--skip-1thread", action="store_true", help="no 1-thread baseline (it matters on tiny models)")
    ap.add_argument("--skip-1worker", action="store_true", help="no 1-worker platform run (the config's workers only)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child)
        return

    from aigc.config import load_config

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="aigc-bench-") as tmp:
        src = os.path.join(tmp, "rows.jsonl")
        with open(DEMO_DATA) as f, open(src, "w") as out:
            lines = [line for line in f if line.strip()]
            out.writelines(lines[: args.rows] if args.rows else lines)
        overrides = [f"data.path={src}", f"output_dir={tmp}/out", f"registry_dir={tmp}/registry",
                     "data.val_fraction=0", f"train.epochs={args.epochs}",
                     f"cluster.num_cpus={max(4, cores + 1)}"]  # fmt: skip
        if args.model_shape:  # same tokenizer as the demo model: the shards below serve both
            shape = build_shape(args.model_shape, os.path.join(tempfile.gettempdir(), f"aigc-shape-{args.model_shape}"))
            overrides.append(f"model.name_or_path={shape}")
        cfg = load_config(args.config, overrides)
        subprocess.run([sys.executable, "-m", "aigc.cli", "preprocess", "--config", args.config, *overrides],
                       stdout=subprocess.DEVNULL, check=True)  # fmt: skip
        tokens = _train_tokens(cfg.output_dir) * args.epochs
        workers, batch = cfg.train.num_workers, cfg.train.batch_size
        one_worker = ["train.num_workers=1", f"train.cpus_per_worker={cores}", f"train.batch_size={batch * workers}"]
        runs = {"baseline": _run("baseline", overrides, args, tmp, cores)}
        if not args.skip_1thread:
            runs["baseline_1thread"] = _run("baseline", overrides, args, tmp, 1)
        if not args.skip_1worker:
            runs["platform_1w"] = _run("platform", [*overrides, *one_worker], args, tmp, cores)
        runs[f"platform_{workers}w"] = _run("platform", overrides, args, tmp, cores)
    for r in runs.values():
        r["train_s"] = sum(h["epoch_time_s"] for h in r["history"])
        r["tokens_per_s"] = tokens / r["train_s"]

    base = runs["baseline"]["tokens_per_s"]
    print(f"model: {args.model_shape or 'demo tiny-base'}, "
          f"rows: {len(lines[: args.rows] if args.rows else lines)}, epochs: {args.epochs}, cores: {cores}, "
          f"global batch: {batch * workers}, train tokens (non-padding, all epochs): {tokens}")  # fmt: skip
    print(f"  {'run':16s} {'tokens/s':>9s} {'x base':>7s} {'train s':>8s} {'wall s':>7s} "
          f"{'peak RSS MiB':>12s} {'peak PSS MiB':>12s} {'final loss':>10s}")  # fmt: skip
    for name, r in runs.items():
        print(f"  {name:16s} {r['tokens_per_s']:9.0f} {r['tokens_per_s'] / base:6.2f}x {r['train_s']:8.1f} "
              f"{r['wall_s']:7.1f} {r['peak_rss_bytes'] / 2**20:12.0f} {r['peak_pss_bytes'] / 2**20:12.0f} "
              f"{r['history'][-1]['train_loss']:10.3f}")  # fmt: skip
    for name, r in runs.items():
        if "platform" in name:
            own = [h.get("train_tokens_per_s") for h in r["history"]]
            print(
                f"  {name}: {r['tokens_per_s'] / base:.2f}x the baseline's tokens/s, wall "
                f"{r['wall_s'] / runs['baseline']['wall_s']:.2f}x; its own train_tokens_per_s per epoch: {own}"
            )
            top = list(r["cpu_s_by_process"].items())[:8]
            print("    CPU seconds by process over the whole run: " + ", ".join(f"{k} {v:.1f}" for k, v in top))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"train_throughput-{time.strftime('%Y%m%d-%H%M%S')}.json")
    figures = {"model_shape": args.model_shape, "rows": len(lines[: args.rows] if args.rows else lines),
               "epochs": args.epochs, "cores": cores,
               "global_batch": batch * workers, "train_tokens": tokens, "runs": runs}  # fmt: skip
    with open(path, "w") as f:
        json.dump(figures, f, indent=1)
    print(f"figures: {path}")


if __name__ == "__main__":
    main()

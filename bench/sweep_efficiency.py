"""Sweep efficiency: an 8-trial ASHA sweep against the same 8 configurations trained to completion.

    PYTHONPATH=platform .venv/bin/python bench/sweep_efficiency.py [--epochs 1] [--eval-every 25] [--rows N]

On the demo data (or ``--rows`` freshly generated demo rows, for a shorter run) and config
(``configs/demo.yaml``: the tiny base model, 1-worker trials on the embedded cluster; each trial trains
``--epochs`` (``tune.epochs``) and reports every ``--eval-every`` steps (``tune.eval_every_steps``; 0 = at
epoch ends only)), in one run:

- (a) ``tune.scheduler=asha``: grid over 4 learning rates x 2 LoRA ranks (8 trials), ASHA at every report;
- (b) ``tune.scheduler=none``: the same 8 configurations, every trial to its last step.

For each: wall time of the sweep (``run_sweep``: data read once, trials, table, plots, publishing), the sum of the
trials' training time (the training steps between reports, ``train_time_s``: no evaluation), trial-epochs (fractional
for a trial stopped mid-epoch), best eval loss, and overhead per trial = (wall x concurrency - training time) /
trials, and the same less the trials' evaluations (``eval_time_s``: eval loss and the generation metrics, as often as
the trials report). Also where a trial's time goes on average: set-up before its first epoch (``trial_setup_s``:
config, model build, first evaluation), epochs, and the rest (evaluations, checkpoints, reports, teardown as Tune
measures the trial); and the set-up's phases, from the trial's ``trial_<phase>_s`` reports: imports + config (the
first trial of a process imports torch, transformers, peft), tokenizer + generation prompts, model build, and the rest
before the first report but the training steps (the base model's evaluation, data start-up, the first epoch-end
evaluation with its generation metrics, the first checkpoint).

``--per-trial-loading`` adds (c), run between (a) and (b): (b) again with every trial loading its own
tokenizer and taking its own generation prompts from the val split (what trials did before the sweep driver
shared them), to measure what sharing saves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))  # PYTHONPATH wins

from aigc.cli import check_stage  # noqa: E402
from aigc.cluster import init_ray  # noqa: E402
from aigc.config import load_config  # noqa: E402
from aigc.data.preprocess import preprocess  # noqa: E402
from aigc.demo.dataset import generate_support_examples  # noqa: E402
from aigc.tune.sweep import run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Trials start in grid order (lr outer, r inner). Asynchronous ASHA compares each trial with those that reached
# the rung before it, so a space sorted from worst to best lets it stop nothing; this order is a plain mix.
SPACE = "train.lr: {grid: [3.0e-3, 1.0e-4, 8.0e-3, 1.0e-3]}\nlora.r: {grid: [4, 16]}\n"


def _trials(exp_dir: Path) -> list[list[dict]]:
    """Every trial's reports (result.json lines)."""
    out = []
    for f in sorted(exp_dir.glob("*/result.json")):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if lines:
            out.append(lines)
    return out


PHASES = ("imports_config", "tokenizer_samples", "model", "evals_restore")


def _measure(cfg, label: str, per_trial_loading: bool = False) -> dict:
    import aigc.tune.sweep as sweep

    shared = sweep._shared_trial_inputs
    if per_trial_loading:  # the trials load the tokenizer and take the prompts themselves
        sweep._shared_trial_inputs = lambda *a: {"tokenizer": None, "gen_samples": None}
    t0 = time.perf_counter()
    try:
        res = run_sweep(cfg, register=False)
    finally:
        sweep._shared_trial_inputs = shared
    wall = time.perf_counter() - t0
    trials = _trials(Path(cfg.output_dir) / "sweep" / res.sweep_id.split("@")[0])
    training = sum(r.get("train_time_s", 0.0) for t in trials for r in t)
    evaluating = sum(r.get("eval_time_s", 0.0) for t in trials for r in t)
    setup = [t[0].get("trial_setup_s", float("nan")) for t in trials]
    total = [t[-1]["time_total_s"] for t in trials]
    epochs = sum(t[-1]["epoch"] for t in trials)
    at_once = cfg.tune.max_concurrent_trials or _at_once(cfg, len(trials))
    return {
        "label": label,
        "wall_s": wall,
        "trials": len(trials),
        "at_once": at_once,
        "training_s": training,
        "trial_epochs": epochs,
        "best_eval_loss": float(res.trials["eval_loss"].min()),
        "overhead_per_trial_s": (wall * at_once - training) / len(trials),
        "eval_s": evaluating,
        "overhead_ex_eval_s": (wall * at_once - training - evaluating) / len(trials),
        "mean_setup_s": sum(setup) / len(setup),
        "mean_trial_s": sum(total) / len(total),
        "mean_epochs_s": training / len(trials),
        "phases": {p: _mean([t[0].get(f"trial_{p}_s") for t in trials]) for p in PHASES},
    }


def _mean(values: list) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def _at_once(cfg, trials: int) -> int:
    import ray

    from aigc.tune.concurrency import plan_concurrency

    return plan_concurrency(cfg, trials, ray.cluster_resources()).at_once


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1, help="epochs of each trial (tune.epochs)")
    p.add_argument("--eval-every", type=int, default=25, help="a report every N steps (0 = at epoch ends only)")
    p.add_argument("--rows", type=int, default=None, help="generated demo rows instead of the demo file")
    p.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    p.add_argument("--per-trial-loading", action="store_true", help="add (c): (b) with per-trial tokenizer loading")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="aigc-sweep-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "space.yaml").write_text(SPACE)
    data = ROOT / "assets" / "demo-data" / "support.jsonl"
    if args.rows:
        data = out / "support.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in generate_support_examples(args.rows, seed=11)))
    base = [
        f"output_dir={out / 'run'}", f"registry_dir={out / 'registry'}", f"tune.space={out / 'space.yaml'}",
        "tune.search=grid", "tune.num_samples=8", f"tune.epochs={args.epochs}",
        f"tune.eval_every_steps={args.eval_every or 'null'}",
        f"model.name_or_path={ROOT / 'assets' / 'tiny-base'}",
        f"data.path={data}",
    ]  # fmt: skip
    cfg = check_stage("preprocess", load_config(ROOT / "configs" / "demo.yaml", base))  # before any Ray work
    print(f"load average at start: {os.getloadavg()[0]:.1f} (1 min), {os.cpu_count()} cores", flush=True)
    init_ray(cfg.cluster.num_cpus)
    preprocess(cfg.data, cfg.model, cfg.output_dir)
    rows = [
        _measure(load_config(ROOT / "configs" / "demo.yaml", [*base, "tune.scheduler=asha", "tune.name=asha"]),
                 "(a) ASHA"),
    ]  # fmt: skip
    if args.per_trial_loading:  # before (b): a load that falls during the run favours the later one
        cfg_c = load_config(ROOT / "configs" / "demo.yaml", [*base, "tune.scheduler=none", "tune.name=per-trial"])
        rows.append(_measure(cfg_c, "(c) = (b), per-trial loading", per_trial_loading=True))
    cfg_b = load_config(ROOT / "configs" / "demo.yaml", [*base, "tune.scheduler=none", "tune.name=full"])
    rows.insert(1, _measure(cfg_b, "(b) to completion"))
    print("\n| run | wall | trials x at once | training | trial-epochs | overhead/trial | evaluations | "
          "overhead/trial less evaluations | best eval loss |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['wall_s']:.1f} s | {r['trials']} x {r['at_once']} | {r['training_s']:.1f} s | "
              f"{r['trial_epochs']:.2f} | {r['overhead_per_trial_s']:.1f} s | {r['eval_s']:.1f} s | "
              f"{r['overhead_ex_eval_s']:.1f} s | {r['best_eval_loss']:.4f} |")  # fmt: skip
    print("\nwhere a trial's time goes (means): set-up before the first epoch | epochs | whole trial")
    for r in rows:
        print(f"  {r['label']}: {r['mean_setup_s']:.1f} s | {r['mean_epochs_s']:.1f} s | {r['mean_trial_s']:.1f} s")
    print("\nset-up phases (means, s): " + " | ".join(PHASES))
    for r in rows:
        print(f"  {r['label']}: " + " | ".join(f"{r['phases'][p]:.2f}" for p in PHASES))
    print(f"load average at the end: {os.getloadavg()[1]:.1f} (5 min)")
    a, b = rows[:2]
    print(f"\nASHA trial-epochs: {a['trial_epochs'] / b['trial_epochs']:.0%} of (b)'s (target <= 50%); best eval loss "
          f"{a['best_eval_loss'] / b['best_eval_loss'] - 1:+.1%} vs (b)'s best (target within 5%)")  # fmt: skip


if __name__ == "__main__":
    main()

"""The ``aigc`` command. Every subcommand calls the same functions as the scripts in ``jobs/``.

    aigc preprocess --config configs/demo.yaml [section.key=value ...]
    aigc train      --config configs/demo.yaml train.epochs=5
    aigc sweep      --config configs/demo.yaml tune.num_samples=8
    aigc serve      --config configs/demo.yaml serve.port=8001
    aigc demo       --config configs/demo.yaml
    aigc config     --config configs/demo.yaml          # print the resolved config
    aigc registry   --config configs/demo.yaml          # list registered adapters
    aigc build-assets                                   # rebuild the tiny base model and demo data

Config errors are reported before any Ray work starts, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import yaml

from aigc.config import PlatformConfig, load_config
from aigc.errors import AigcError, ConfigError

__all__ = ["main", "run_stage"]


def _preprocess(cfg: PlatformConfig) -> None:
    from aigc.data.preprocess import preprocess

    res = preprocess(cfg.data, cfg.model, cfg.output_dir)
    s = res.stats
    print(
        f"[preprocess] {s['rows_in']} rows in -> {s['rows_kept']} kept ({s['rows_train']} train / "
        f"{s['rows_val']} val), rejected {s['rows_rejected'] or 'none'}; {s['tokens_total']} tokens, "
        f"max {s['tokens_per_example']['max']} per example\n[preprocess] wrote {res.data_dir}"
    )


def _train(cfg: PlatformConfig) -> None:
    from aigc.train.trainer import run_training

    res = run_training(cfg)
    m = res.metrics
    print(
        f"[train] eval loss {m.get('initial_eval_loss', float('nan')):.4f} -> {m.get('eval_loss', float('nan')):.4f} "
        f"(perplexity {m.get('eval_perplexity', float('nan')):.2f}) after {m.get('epoch')} epochs\n"
        f"[train] adapter: {res.adapter_dir}; registered as {res.registry_id}"
    )


def _sweep(cfg: PlatformConfig) -> None:
    from aigc.tune.sweep import run_sweep

    res = run_sweep(cfg)
    print(f"[sweep] best {res.best_overrides}: eval loss {res.best_metrics.get('eval_loss'):.4f}; "
          f"registered as {res.registry_id}")  # fmt: skip


def _serve(cfg: PlatformConfig) -> None:
    from aigc.serve.run import run_server

    run_server(cfg, blocking=True)


def _demo(cfg: PlatformConfig) -> None:
    from aigc.demo import run_demo

    run_demo(cfg)


STAGES: dict[str, Callable[[PlatformConfig], None]] = {
    "preprocess": _preprocess,
    "train": _train,
    "sweep": _sweep,
    "serve": _serve,
    "demo": _demo,
}


def _precheck(stage: str, cfg: PlatformConfig) -> None:
    """Checks that need no cluster, so bad input fails before any Ray work."""
    from aigc.data.preprocess import list_input_files, read_stats
    from aigc.tune.space import load_space

    if stage in ("preprocess", "demo"):
        list_input_files(cfg.data.path)
    if stage in ("train", "sweep"):
        read_stats(cfg.output_dir)
    if stage in ("sweep", "demo"):
        load_space(cfg.tune.space, cfg)


def run_stage(stage: str, cfg: PlatformConfig) -> None:
    """Check the inputs, join or start the Ray cluster and run one stage (what ``jobs/<stage>.py`` calls).

    Raises:
        ConfigError, DataError: bad config or input, detected before the cluster starts.
    """
    from aigc.cluster import init_ray

    _precheck(stage, cfg)
    init_ray(cfg.cluster.num_cpus)
    STAGES[stage](cfg)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aigc", description="Fine-tune and serve generative text models on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in [*STAGES, "config", "registry"]:
        sp = sub.add_parser(name, help=f"run the {name} stage" if name in STAGES else f"show the {name}")
        sp.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
        sp.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after the file")
    b = sub.add_parser("build-assets", help="rebuild the tiny base model and the demo dataset")
    b.add_argument("--model-dir", default="assets/tiny-base")
    b.add_argument("--data-path", default="assets/demo-data/support.jsonl")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "build-assets":
        from aigc.data.demo import write_demo_dataset
        from aigc.models.tiny import build_tiny_base

        print(f"[assets] {write_demo_dataset(args.data_path)} -> {args.data_path}")
        print(f"[assets] {build_tiny_base(args.model_dir)} -> {args.model_dir}")
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"aigc {args.command}: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        return 0
    if args.command == "registry":
        from aigc.registry import Registry

        for e in Registry(cfg.registry_dir).list():
            print(json.dumps({"model": e.model_id, "base_model": e.base_model, "eval_loss": e.metrics.get("eval_loss"),
                              "adapter": e.adapter_uri}))  # fmt: skip
        return 0
    try:
        run_stage(args.command, cfg)
    except AigcError as exc:  # what the user can fix: one line; anything else is a bug and keeps its traceback
        print(f"aigc {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

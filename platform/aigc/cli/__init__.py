"""The ``aigc`` command. Every subcommand calls the same functions as the scripts in ``jobs/``.

    aigc preprocess --config configs/demo.yaml [section.key=value ...]
    aigc train      --config configs/demo.yaml train.epochs=5
    aigc sweep      --config configs/demo.yaml tune.num_samples=8
    aigc serve      --config configs/demo.yaml serve.port=8001
    aigc demo       --config configs/demo.yaml
    aigc pipeline   --config configs/demo.yaml          # preprocess -> sweep -> train -> register -> serve, resumable
    aigc config     --config configs/demo.yaml          # print the resolved config
    aigc registry   --config configs/demo.yaml [--json] # registered models and aliases (a table, or JSON lines)
    aigc export NAME[:vN] --out DIR [--merge] --config configs/demo.yaml  # a registered model as a plain dir
    aigc promote support-bot:v3 [--alias stable] --config configs/demo.yaml   # move an alias (default: bare name)
    aigc rollback support-bot [--alias stable] --config configs/demo.yaml     # back to its previous target
    aigc feedback export --config configs/demo.yaml [--min-rating 1] [--output PATH]  # rated answers -> JSONL
    aigc build-assets                                   # rebuild the tiny base model and demo data
    aigc submit train --config configs/demo.yaml [k=v ...]   # run a stage as a job on RAY_ADDRESS's cluster
    aigc jobs list | logs ID [--follow] | stop ID       # the cluster's jobs (RAY_AUTH_MODE=token: see submit.py)
    aigc --verbose train ...                           # Ray's worker output on the console too (AIGC_VERBOSE=1)
    aigc kuberay [--image REPO:TAG] [--storage s3://bucket/aigc] [--out deploy/kuberay]  # KubeRay manifests

Config errors are reported before any Ray work starts, with exit status 2; any other platform error
(bad data, a registry problem, a failed run) is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import yaml

from aigc.config import PlatformConfig, load_config
from aigc.errors import AigcError, ConfigError

__all__ = ["main", "run_stage"]


def _preprocess(cfg: PlatformConfig) -> None:
    from aigc.data.preprocess import preprocess
    from aigc.report import report_preprocess

    report_preprocess(preprocess(cfg.data, cfg.model, cfg.output_dir))


def _train(cfg: PlatformConfig) -> None:
    from aigc.report import report_train
    from aigc.train.trainer import run_training

    report_train(run_training(cfg))


def _sweep(cfg: PlatformConfig) -> None:
    from aigc.report import report_sweep
    from aigc.tune.sweep import run_sweep

    report_sweep(run_sweep(cfg))


def _serve(cfg: PlatformConfig) -> None:
    from aigc.cluster import in_submitted_job
    from aigc.serve.run import run_server

    # As a Ray job (`aigc submit serve`, `ray job submit -- python jobs/serve.py`) nobody can press Ctrl-C:
    # deploy, wait until healthy and return. Serve's actors outlive the job, so the app keeps serving.
    detached = in_submitted_job()
    run_server(cfg, blocking=not detached)
    if detached:
        print("[serve] the app keeps running on the cluster after this job; `serve shutdown` stops it")


def _demo(cfg: PlatformConfig) -> None:
    from aigc.demo.driver import run_demo

    run_demo(cfg)


def _pipeline(cfg: PlatformConfig) -> None:
    from aigc.pipeline import run_pipeline

    run_pipeline(cfg, block=cfg.pipeline.keep_serving)


STAGES: dict[str, Callable[[PlatformConfig], None]] = {
    "preprocess": _preprocess,
    "train": _train,
    "sweep": _sweep,
    "serve": _serve,
    "demo": _demo,
    "pipeline": _pipeline,
}


def _check_context(cfg: PlatformConfig) -> None:
    """``data.max_length`` and ``serve.max_tokens_cap`` must fit the model's context, when it is known here."""
    from aigc.models.loading import context_length

    ctx = context_length(cfg.model.load_path())
    if ctx is None:
        return
    if cfg.data.max_length > ctx:
        raise ConfigError(
            f"data.max_length: {cfg.data.max_length} is longer than the context of {cfg.model.name_or_path} "
            f"({ctx} tokens); set data.max_length={ctx} or less"
        )
    if cfg.serve.max_tokens_cap >= ctx:
        raise ConfigError(
            f"serve.max_tokens_cap: {cfg.serve.max_tokens_cap} leaves no room for a prompt in the context of "
            f"{cfg.model.name_or_path} ({ctx} tokens); set it below {ctx}"
        )


def _precheck(stage: str, cfg: PlatformConfig) -> PlatformConfig:
    """Checks that need no cluster, so bad input fails before any Ray work; returns ``cfg`` with its base model
    resolved (a hub id pinned to one commit and downloaded once, here: :mod:`aigc.models.hub`)."""
    from aigc.data.preprocess import check_tokenized_for, read_stats
    from aigc.data.reading import check_columns, list_input_files
    from aigc.models.hub import resolve_model

    given = cfg
    if stage == "pipeline":
        from aigc.pipeline.stages import check_pipeline, pipeline_config

        check_pipeline(cfg)
        cfg = pipeline_config(cfg)  # the data it reads: data.path plus pipeline.feedback
    deploys = stage == "serve" or (stage == "pipeline" and cfg.pipeline.deploy)
    if deploys:  # no keys on a public address: refuse before anything else
        from aigc.serve.auth import check_exposure

        s = cfg.serve
        check_exposure(s.host, s.auth, s.api_keys_file, s.api_keys_env)
    if stage == "demo":
        from aigc.demo.driver import check_output_dir

        check_output_dir(cfg)
    if stage in ("preprocess", "demo", "pipeline"):
        check_columns(list_input_files(cfg.data), cfg.data)  # every source: its files exist and fit its format
    trains = stage in ("train", "sweep", "pipeline")
    if trains:
        from aigc.train.model_setup import check_strategy

        check_strategy(cfg.train)
    if stage in ("sweep", "demo") or (stage == "pipeline" and cfg.pipeline.sweep):
        from aigc.tune.search import check_sweep

        check_sweep(cfg)  # the space, the metric, grid size, PBT's keys, Optuna installed
    # The tokenizer and config first (small): enough for every check. The weights (large) last, once nothing
    # else can fail here, for the stages that train or serve.
    resolved = cfg.model_copy(update={"model": resolve_model(cfg.model, weights=False)})
    _check_context(resolved)
    if trains and cfg.train.method != "full":
        from aigc.models.targets import check_target_modules

        check_target_modules(resolved.model, cfg.lora)
    if stage in ("train", "sweep"):  # the pipeline preprocesses first
        check_tokenized_for(read_stats(cfg.output_dir), resolved.model, cfg.output_dir)
    model = resolve_model(resolved.model, weights=stage != "preprocess")
    return given.model_copy(update={"model": model})


def run_stage(stage: str, cfg: PlatformConfig) -> None:
    """Check the inputs, join or start the Ray cluster and run one stage (what ``jobs/<stage>.py`` calls).

    Raises:
        AigcError: bad config or input (detected before the cluster starts), or a stage that failed.
    """
    from aigc.cluster import init_ray

    cfg = _precheck(stage, cfg)
    init_ray(cfg.cluster.num_cpus)
    STAGES[stage](cfg)


def _show_registry(cfg: PlatformConfig, as_json: bool) -> None:
    from aigc.registry import Registry
    from aigc.report import registry_table

    reg = Registry(cfg.registry_dir)
    entries, aliases = reg.list(), reg.aliases()
    if not as_json:
        print(registry_table(entries))
        for a in aliases:
            previous = ", ".join(f"v{h['version']}" for h in a.history) or "-"
            print(f"alias {a.model_id} -> {a.target} (before: {previous})")
        return
    for e in entries:
        print(json.dumps({"model": e.model_id, "kind": e.kind, "base_model": e.base_model,
                          "base_model_commit": e.base_model_commit, "data_hash": e.data_hash,
                          "eval_loss": e.metrics.get("eval_loss"), "created_at": e.created_at,
                          "path": e.adapter_uri}))  # fmt: skip
    for a in aliases:
        print(json.dumps({"alias": a.model_id, "target": a.target, "previous": [h["version"] for h in a.history]}))


def _export(cfg: PlatformConfig, model_id: str, out: str, merge: bool) -> None:
    from aigc.registry.export import export_model
    from aigc.report import report_export

    report_export(export_model(cfg.registry_dir, model_id, out, merge=merge))


def _move_alias(cfg: PlatformConfig, args: argparse.Namespace) -> None:
    """``aigc promote`` / ``aigc rollback``: move an alias and say where it pointed before."""
    from aigc.registry import Registry

    reg = Registry(cfg.registry_dir)
    if args.command == "promote":
        alias, before = reg.promote(args.target, args.alias)
    else:
        alias, before = reg.rollback(args.name, args.alias)
    was = "unset (latest)" if before is None else f"v{before}"
    print(f"[{args.command}] {alias.model_id} -> {alias.target} (was {was})")


def _cluster_command(args: argparse.Namespace) -> int:
    """``aigc submit`` and ``aigc jobs``: talk to a cluster's job server (no local config is loaded)."""
    from aigc.cluster import submit

    address = args.address
    if args.command == "submit":
        print(submit.submit_stage(args.stage, args.config, args.overrides, address, args.python))
    elif args.action == "list":
        for job in submit.list_jobs(address):
            print(json.dumps(job))
    elif args.action == "logs":
        submit.write_logs(args.id, args.follow, address=address)
    else:
        stopped = submit.stop_job(args.id, address)
        print(f"[jobs] {args.id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aigc", description="Fine-tune and serve generative text models on Ray.")
    verbose_help = "show Ray's worker output on the console (sets AIGC_VERBOSE=1 before any Ray work)"
    p.add_argument("--verbose", "-v", action="store_true", help=verbose_help)
    sub = p.add_subparsers(dest="command", required=True)
    for name in [*STAGES, "config", "registry"]:
        sp = sub.add_parser(name, help=f"run the {name} stage" if name in STAGES else f"show the {name}")
        sp.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
        sp.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after the file")
        if name == "registry":
            sp.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    x = sub.add_parser("export", help="write a registered model as a plain directory (merged with --merge)")
    x.add_argument("model_id", metavar="NAME[:vN]", help="registered name (latest version) or name:vN")
    x.add_argument("--out", "-o", required=True, help="directory to write (replaced if it exists; local or URI)")
    x.add_argument("--merge", action="store_true", help="merge a LoRA adapter into its base model (safetensors)")
    pr = sub.add_parser("promote", help="point an alias (default: the bare name) at a registered version")
    pr.add_argument("target", help="the version to serve, NAME:vN (or NAME:ALIAS to copy another alias)")
    rb = sub.add_parser("rollback", help="point an alias back at its previous target")
    rb.add_argument("name", help="the registered model name")
    for sp in (pr, rb):
        sp.add_argument("--alias", "-a", help="the alias to move, e.g. stable (default: the bare name)")
    for sp in (x, pr, rb):
        sp.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
        sp.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after the file")
    f = sub.add_parser("feedback", help="work with captured answers and their feedback (serve.capture)")
    e = f.add_subparsers(dest="action", required=True).add_parser(
        "export", help="write rated answers (and corrections) as a messages-format JSONL dataset"
    )
    e.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    e.add_argument("--min-rating", type=int, default=1, choices=(-1, 0, 1), help="keep answers rated at least this")
    e.add_argument("--output", "-o", help="the JSONL file to write (default: <output_dir>/feedback-export.jsonl)")
    e.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after the file")
    su = sub.add_parser("submit", help="run a stage as a Ray job on the cluster at RAY_ADDRESS; prints its id")
    su.add_argument("stage", choices=list(STAGES))
    su.add_argument("--config", "-c", help="YAML config file inside this project (it travels with the job)")
    su.add_argument("--address", help="the cluster's dashboard URL (default: RAY_ADDRESS)")
    su.add_argument("--python", default="python", help="the interpreter on the head node (default: python)")
    su.add_argument("overrides", nargs="*", help="section.key=value overrides, passed to the job")
    j = sub.add_parser("jobs", help="list the cluster's jobs, show a job's logs, stop a job")
    ja = j.add_subparsers(dest="action", required=True)
    ja.add_parser("list", help="every submitted job, oldest first (one JSON line each)")
    jl = ja.add_parser("logs", help="a job's log")
    jl.add_argument("id")
    jl.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    ja.add_parser("stop", help="ask a job to stop").add_argument("id")
    for sp in ja.choices.values():
        sp.add_argument("--address", help="the cluster's dashboard URL (default: RAY_ADDRESS)")
    k = sub.add_parser("kuberay", help="write the RayCluster, RayJob and RayService manifests")
    k.add_argument("--image", default=None, help="the image every pod runs (built from deploy/kuberay/Dockerfile)")
    k.add_argument("--storage", default="s3://my-bucket/aigc", help="shared storage for registry/ and runs/")
    k.add_argument("--out", default="deploy/kuberay", help="the directory to write them to")
    b = sub.add_parser("build-assets", help="rebuild the tiny base model and the demo dataset")
    b.add_argument("--model-dir", default="assets/tiny-base")
    b.add_argument("--data-path", default="assets/demo-data/support.jsonl")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # `aigc export NAME --out DIR k=v`, `aigc promote bot:v2 --alias stable k=v`: argparse ends the positionals
    # at the option, so overrides after an option come back unrecognised; they are still overrides.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.verbose:  # read by aigc.cluster.init_ray, here and in every job and worker started from this process
        os.environ["AIGC_VERBOSE"] = "1"
    try:
        if args.command == "build-assets":
            from aigc.demo.dataset import write_demo_dataset
            from aigc.demo.tiny_base import build_tiny_base

            print(f"[assets] {write_demo_dataset(args.data_path)} -> {args.data_path}")
            print(f"[assets] {build_tiny_base(args.model_dir)} -> {args.model_dir}")
            return 0
        if args.command in ("submit", "jobs"):
            return _cluster_command(args)
        if args.command == "kuberay":
            from aigc.cluster.kuberay import DEFAULT_IMAGE, write_manifests

            for path in write_manifests(args.out, image=args.image or DEFAULT_IMAGE, storage=args.storage):
                print(f"[kuberay] {path}")
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            print(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        elif args.command == "registry":
            _show_registry(cfg, args.json)
        elif args.command == "export":
            _export(cfg, args.model_id, args.out, args.merge)
        elif args.command in ("promote", "rollback"):
            _move_alias(cfg, args)
        elif args.command == "feedback":
            from aigc.feedback.export import export_feedback

            export_feedback(cfg, args.min_rating, args.output)
        else:
            run_stage(args.command, cfg)
    except ConfigError as exc:
        print(f"aigc {args.command}: {exc}", file=sys.stderr)
        return 2
    except AigcError as exc:  # what the user can fix: one line; anything else is a bug and keeps its traceback
        print(f"aigc {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

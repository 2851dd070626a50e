"""The ``aigc`` command. Every subcommand calls the same functions as the scripts in ``jobs/``.

    aigc preprocess --config configs/demo.yaml [section.key=value ...]
    aigc train      --config configs/demo.yaml train.epochs=5
    aigc sweep      --config configs/demo.yaml tune.num_samples=8
    aigc serve      --config configs/demo.yaml serve.port=8001
    aigc demo       --config configs/demo.yaml
    aigc pipeline   --config configs/demo.yaml          # preprocess -> sweep -> train -> register -> serve, resumable
    aigc generate   --config configs/demo.yaml generate.input=PROMPTS generate.model=NAME:vN  # answers, resumable
    aigc eval       --config configs/demo.yaml --models base NAME:v1 NAME:v2  # side by side on generate.input
    aigc config     --config configs/demo.yaml          # print the resolved config
    aigc registry   --config configs/demo.yaml [--json] # registered models and aliases (a table, or JSON lines)
    aigc export NAME[:vN] --out DIR [--merge] --config configs/demo.yaml  # a registered model as a plain dir
    aigc promote support-bot:v3 [--alias stable] --config configs/demo.yaml   # move an alias (default: bare name)
    aigc rollback support-bot [--alias stable] --config configs/demo.yaml     # back to its previous target
    aigc traffic support-bot v3=90 v4=10 [--alias stable] --config configs/demo.yaml  # split between versions
    aigc feedback export --config configs/demo.yaml [--min-rating 1 | --pairs] [--output PATH]  # rated -> JSONL
    aigc feedback compare support-bot --config configs/demo.yaml  # each version's ratings side by side
    aigc feedback delete --config configs/demo.yaml --before 2026-11-01 | --key NAME  # captures + feedback
    aigc keys add NAME [--rpm N --tpm N --concurrency N --models a,b --expires DATE] [--file PATH]  # printed once
    aigc keys list | revoke NAME | migrate | usage      # the keys file (serve.api_keys_file): hashes and policies
    aigc build-assets                                   # rebuild the tiny base model and demo data
    aigc submit train --config configs/demo.yaml [k=v ...]   # run a stage as a job on RAY_ADDRESS's cluster
    aigc jobs list | logs ID [--follow] | stop ID       # the cluster's jobs (RAY_AUTH_MODE=token: see submit.py)
    aigc --verbose train ...                           # Ray's worker output on the console too (AIGC_VERBOSE=1)
    aigc kuberay [--image REPO:TAG] [--storage s3://bucket/aigc] [--operator-namespace NS] [--out deploy/kuberay]

Config errors are reported before any Ray work starts, with exit status 2; any other platform error
(bad data, a registry problem, a failed run) is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from aigc.cli.commands import COMMANDS, add_config_arguments
from aigc.cli.stages import STAGES, check_stage, run_stage
from aigc.config import load_config
from aigc.errors import AigcError, ConfigError

__all__ = ["STAGES", "build_parser", "check_stage", "main", "run_stage"]


def build_parser() -> argparse.ArgumentParser:
    """The ``aigc`` parser: one subcommand per entry of the stage table and of the command table."""
    p = argparse.ArgumentParser(prog="aigc", description="Fine-tune and serve generative text models on Ray.")
    verbose_help = "show Ray's worker output on the console (sets AIGC_VERBOSE=1 before any Ray work)"
    p.add_argument("--verbose", "-v", action="store_true", help=verbose_help)
    sub = p.add_subparsers(dest="command", required=True)
    for name, stage in STAGES.items():
        stage_parser = sub.add_parser(name, help=stage.help)
        add_config_arguments(stage_parser)
        if stage.arguments is not None:
            stage.arguments(stage_parser)
    for name, command in COMMANDS.items():
        command.arguments(sub.add_parser(name, help=command.help))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
        if args.command in STAGES:
            if STAGES[args.command].overrides is not None:
                args.overrides = [*args.overrides, *STAGES[args.command].overrides(args)]
            run_stage(args.command, load_config(args.config, args.overrides))
        else:
            command = COMMANDS[args.command]
            command.run(args, load_config(args.config, args.overrides) if command.reads_config else None)
    except ConfigError as exc:
        print(f"aigc {args.command}: {exc}", file=sys.stderr)
        return 2
    except AigcError as exc:  # what the user can fix: one line; anything else is a bug and keeps its traceback
        print(f"aigc {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0

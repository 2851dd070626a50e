"""The ``aigc`` subcommands that need no cluster of their own, as a table: the config, the registry (list,
export, promote, rollback), feedback export and delete, jobs on a remote cluster, KubeRay manifests and the
demo assets."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import yaml

from aigc.cli.stages import STAGES
from aigc.cluster.lockdown import OPERATOR_NAMESPACE
from aigc.config import PlatformConfig, load_config
from aigc.errors import ConfigError

__all__ = ["COMMANDS", "Command", "add_config_arguments"]


@dataclass(frozen=True)
class Command:
    """One subcommand: its help, its own arguments, and what it does (``cfg``: the loaded ``--config`` with
    its overrides, for a command that reads one; None otherwise)."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, PlatformConfig | None], None]
    reads_config: bool = True


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after the file")


def _registry_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")


def _show_config(args: argparse.Namespace, cfg: PlatformConfig | None) -> None:
    print(yaml.safe_dump(cfg.model_dump(), sort_keys=False))


def _show_registry(args: argparse.Namespace, cfg: PlatformConfig | None) -> None:
    from aigc.registry import Registry
    from aigc.report import registry_table

    reg = Registry(cfg.registry_dir)
    entries, aliases = reg.list(), reg.aliases()
    if not args.json:
        print(registry_table(entries))
        for a in aliases:
            previous = ", ".join(f"v{h['version']}" for h in a.history) or "-"
            print(f"alias {a.model_id} -> {a.shown_target} (before: {previous})")
        return
    for e in entries:
        print(json.dumps({"model": e.model_id, "kind": e.kind, "base_model": e.base_model,
                          "base_model_commit": e.base_model_commit, "data_hash": e.data_hash,
                          "eval_loss": e.metrics.get("eval_loss"), "created_at": e.created_at,
                          "path": e.adapter_uri}))  # fmt: skip
    for a in aliases:
        print(json.dumps({"alias": a.model_id, "target": a.target, "previous": [h["version"] for h in a.history],
                          "weights": {f"v{v}": w for v, w in a.split} if a.weights else None}))  # fmt: skip


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_id", metavar="NAME[:vN]", help="registered name (latest version) or name:vN")
    p.add_argument("--out", "-o", required=True, help="directory to write (replaced if it exists; local or URI)")
    p.add_argument("--merge", action="store_true", help="merge a LoRA adapter into its base model (safetensors)")
    add_config_arguments(p)


def _export(args: argparse.Namespace, cfg: PlatformConfig | None) -> None:
    from aigc.registry.export import export_model
    from aigc.report import report_export

    report_export(export_model(cfg.registry_dir, args.model_id, args.out, merge=args.merge))


def _alias_arguments(target: str, target_help: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument(target, help=target_help)
        p.add_argument("--alias", "-a", help="the alias to move, e.g. stable (default: the bare name)")
        add_config_arguments(p)

    return add


def _move_alias(args: argparse.Namespace, cfg: PlatformConfig | None) -> None:
    """``aigc promote`` / ``aigc rollback``: move an alias and say where it pointed before."""
    from aigc.registry import Registry

    reg = Registry(cfg.registry_dir)
    if args.command == "promote":
        alias, before = reg.promote(args.target, args.alias)
    else:
        alias, before = reg.rollback(args.name, args.alias)
    was = "unset (latest)" if before is None else f"v{before}"
    print(f"[{args.command}] {alias.model_id} -> {alias.shown_target} (was {was})")


def _traffic_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the registered model name")
    p.add_argument("weights", nargs="+", metavar="vN=WEIGHT",
                   help="each version's share of the traffic, e.g. v3=90 v4=10 (then any section.key=value "
                   "overrides)")  # fmt: skip
    p.add_argument("--alias", "-a", help="the alias to split, e.g. stable (default: the bare name)")
    p.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")


_WEIGHT = re.compile(r"^v([0-9]+)=(.*)$")


def _traffic(args: argparse.Namespace, cfg: PlatformConfig | None) -> None:
    """``aigc traffic NAME v3=90 v4=10 [k=v ...]``: split an alias's traffic between versions. The weights and
    the config overrides share the positionals, so the config is read here."""
    from aigc.registry import Registry

    weights: dict[int, int] = {}
    overrides = []
    for arg in args.weights:
        m = _WEIGHT.match(arg)
        if m is None:
            overrides.append(arg)
        elif not m.group(2).isdigit():
            raise ConfigError(f"expected vN=WEIGHT with a whole number (e.g. v4=10), got {arg!r}")
        elif int(m.group(1)) in weights:
            raise ConfigError("each version may be named once, e.g. aigc traffic support-bot v3=90 v4=10")
        else:
            weights[int(m.group(1))] = int(m.group(2))
    if not weights:
        raise ConfigError("name each version's share of the traffic, e.g. aigc traffic support-bot v3=90 v4=10")
    cfg = load_config(args.config, overrides)
    alias, before = Registry(cfg.registry_dir).set_traffic(args.name, weights, args.alias)
    was = "unset (latest)" if before is None else before.shown_target
    print(f"[traffic] {alias.model_id} -> {alias.shown_target} (was {was}); a running app follows within "
          "serve.resolve_cache_s; compare ratings with: aigc feedback compare " + args.name)  # fmt: skip


def _date(text: str) -> datetime:
    """``--before``'s value: an ISO date or date-time (UTC unless it names an offset)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (e.g. 2026-11-01 or 2026-11-01T12:00)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _key_names(text: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("name at least one API key, e.g. --keys team-a,team-b")
    return names


def _feedback_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True)
    e = actions.add_parser("export", help="write rated answers (and corrections) as a messages-format JSONL dataset")
    e.add_argument("--min-rating", type=int, default=1, choices=(-1, 0, 1), help="keep answers rated at least this")
    e.add_argument("--pairs", action="store_true",
                   help="write preference pairs (chosen/rejected) for DPO/ORPO instead of supervised rows")  # fmt: skip
    e.add_argument("--output", "-o", help="the JSONL file to write (default: <output_dir>/feedback-export.jsonl, "
                   "or feedback-pairs.jsonl with --pairs)")  # fmt: skip
    e.add_argument("--keys", type=_key_names, help="keep only ratings sent with these API key names (a,b)")
    add_config_arguments(e)
    c = actions.add_parser("compare", help="each version's ratings side by side (e.g. a canary against v3)")
    c.add_argument("name", help="the registered model name")
    c.add_argument("--keys", type=_key_names, help="count only ratings sent with these API key names (a,b)")
    c.add_argument("--json", action="store_true", help="one JSON object per version instead of a table")
    add_config_arguments(c)
    d = actions.add_parser("delete", help="delete captured answers and their feedback: by date or by API key")
    which = d.add_mutually_exclusive_group(required=True)
    which.add_argument("--before", type=_date, help="answers captured before this date (UTC), with their feedback")
    which.add_argument("--key", help="answers made with this API key name (with their feedback), and its ratings")
    add_config_arguments(d)


def _feedback(args: argparse.Namespace, cfg: PlatformConfig | None) -> None:
    from aigc.feedback import delete_feedback, export_feedback
    from aigc.serve.moderation import load_policy

    if args.action == "delete":
        delete_feedback(cfg, before=args.before, key=args.key)
        return
    if args.action == "compare":
        from aigc.feedback.compare import compare_table, compare_versions
        from aigc.feedback.retention import apply_retention, open_store

        store = open_store(cfg)
        apply_retention(store, cfg.serve.capture_retention_days)
        rows = compare_versions(store, args.name, args.keys)
        if not rows:
            print(f"[feedback] no rated answers of {args.name} yet")
        elif args.json:
            print("\n".join(json.dumps(r.to_json()) for r in rows))
        else:
            print(compare_table(rows))
        return
    policy = load_policy(cfg.serve.moderation.categories, cfg.serve.moderation.classifier)  # corrections pass it
    export_feedback(cfg, args.min_rating, args.output, policy=policy, keys=args.keys, pairs=args.pairs)


def _keys_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="make a key: printed once, only its hash is stored")
    add.add_argument("name", help="the key's name (logs, metrics, feedback): letters, digits, '.', '_', '-'")
    add.add_argument("--rpm", type=int, help="requests per minute (default: no limit)")
    add.add_argument("--tpm", type=int, help="tokens per minute, prompt + completion (default: no limit)")
    add.add_argument("--concurrency", type=int, help="requests at once (default: no limit)")
    add.add_argument("--models", help="comma-separated model ids the key may use (default: all)")
    add.add_argument("--expires", help="refused from then on: 2027-01-31 (UTC midnight) or 2027-01-31T12:00:00Z")
    add.add_argument("--admin", action="store_true", help="may load/unload adapters at runtime (/v1/adapters)")
    actions.add_parser("list", help="names, policies, expiry (never keys)")
    actions.add_parser("revoke", help="remove a key (refused within serve.api_keys_reload_s)").add_argument("name")
    actions.add_parser("migrate", help="rewrite an old plain 'name: key' file as hashes")
    usage = actions.add_parser("usage", help="each key's requests and tokens, from the cluster's counter")
    usage.add_argument("--address", help="the Ray cluster (default: RAY_ADDRESS, else the local one)")
    for name, sp in actions.choices.items():
        if name != "usage":
            sp.add_argument("--file", "-f", help="the keys file (default: serve.api_keys_file)")
        add_config_arguments(sp)


def _keys(args: argparse.Namespace, cfg: PlatformConfig | None) -> None:
    from aigc.cli.keys import run_keys_command

    run_keys_command(args, cfg)


def _submit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=list(STAGES))
    p.add_argument("--config", "-c", help="YAML config file inside this project (it travels with the job)")
    p.add_argument("--address", help="the cluster's dashboard URL (default: RAY_ADDRESS)")
    p.add_argument("--python", default="python", help="the interpreter on the head node (default: python)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, passed to the job")


def _submit(args: argparse.Namespace, cfg: PlatformConfig | None) -> None:
    from aigc.cluster import submit

    print(submit.submit_stage(args.stage, args.config, args.overrides, args.address, args.python))


def _jobs_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every submitted job, oldest first (one JSON line each)")
    logs = actions.add_parser("logs", help="a job's log")
    logs.add_argument("id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    actions.add_parser("stop", help="ask a job to stop").add_argument("id")
    for sp in actions.choices.values():
        sp.add_argument("--address", help="the cluster's dashboard URL (default: RAY_ADDRESS)")


def _jobs(args: argparse.Namespace, cfg: PlatformConfig | None) -> None:
    from aigc.cluster import submit

    if args.action == "list":
        for job in submit.list_jobs(args.address):
            print(json.dumps(job))
    elif args.action == "logs":
        submit.write_logs(args.id, args.follow, address=args.address)
    else:
        stopped = submit.stop_job(args.id, args.address)
        print(f"[jobs] {args.id}: {'stop requested' if stopped else 'already finished'}")


def _kuberay_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", default=None, help="the image every pod runs (built from deploy/kuberay/Dockerfile)")
    p.add_argument("--storage", default="s3://my-bucket/aigc", help="shared storage for registry/ and runs/")
    p.add_argument(
        "--operator-namespace",
        default=OPERATOR_NAMESPACE,
        help="the KubeRay operator's namespace (its NetworkPolicies admit it to the dashboard)",
    )
    p.add_argument("--out", default="deploy/kuberay", help="the directory to write them to")


def _kuberay(args: argparse.Namespace, cfg: PlatformConfig | None) -> None:
    from aigc.cluster.kuberay import DEFAULT_IMAGE, write_manifests

    for path in write_manifests(
        args.out, image=args.image or DEFAULT_IMAGE, storage=args.storage, operator_namespace=args.operator_namespace
    ):
        print(f"[kuberay] {path}")


def _assets_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", default="assets/tiny-base")
    p.add_argument("--data-path", default="assets/demo-data/support.jsonl")


def _build_assets(args: argparse.Namespace, cfg: PlatformConfig | None) -> None:
    from aigc.demo.dataset import write_demo_dataset
    from aigc.demo.tiny_base import build_tiny_base

    print(f"[assets] {write_demo_dataset(args.data_path)} -> {args.data_path}")
    print(f"[assets] {build_tiny_base(args.model_dir)} -> {args.model_dir}")


COMMANDS: dict[str, Command] = {
    "config": Command("show the resolved config", add_config_arguments, _show_config),
    "registry": Command("show the registered models and aliases", _registry_arguments, _show_registry),
    "export": Command("write a registered model as a plain directory (merged with --merge)", _export_arguments,
                      _export),
    "promote": Command("point an alias (default: the bare name) at a registered version",
                       _alias_arguments("target", "the version to serve, NAME:vN (or NAME:ALIAS to copy another "
                                        "alias)"), _move_alias),
    "rollback": Command("point an alias back at its previous target",
                        _alias_arguments("name", "the registered model name"), _move_alias),
    "traffic": Command("split an alias's traffic between versions (e.g. a canary: v3=90 v4=10)", _traffic_arguments,
                       _traffic, reads_config=False),
    "feedback": Command("work with captured answers and their feedback (serve.capture)", _feedback_arguments,
                        _feedback),
    "keys": Command("API keys: add (printed once, stored hashed), list, revoke, migrate, usage", _keys_arguments,
                    _keys),
    "submit": Command("run a stage as a Ray job on the cluster at RAY_ADDRESS; prints its id", _submit_arguments,
                      _submit, reads_config=False),
    "jobs": Command("list the cluster's jobs, show a job's logs, stop a job", _jobs_arguments, _jobs,
                    reads_config=False),
    "kuberay": Command("write the RayCluster, RayJob, RayService and NetworkPolicy manifests", _kuberay_arguments,
                       _kuberay,
                       reads_config=False),
    "build-assets": Command("rebuild the tiny base model and the demo dataset", _assets_arguments, _build_assets,
                            reads_config=False),
}  # fmt: skip

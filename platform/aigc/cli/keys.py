"""``aigc keys``: add (the key printed once, its hash stored), list, revoke, migrate an old plain file, usage."""

from __future__ import annotations

import argparse
import time

from aigc.config import PlatformConfig
from aigc.errors import ConfigError
from aigc.serve.auth import migrate_keys_file
from aigc.serve.keys import KeyPolicy, add_key, format_time, parse_time, read_records, revoke_key

__all__ = ["run_keys_command"]


def _file(args: argparse.Namespace, cfg: PlatformConfig | None) -> str:
    path = args.file or (cfg.serve.api_keys_file if cfg is not None else None)
    if not path:
        raise ConfigError("no keys file: give --file PATH or set serve.api_keys_file (in --config or as an override)")
    return path


def _policy(args: argparse.Namespace) -> KeyPolicy:
    for flag in ("rpm", "tpm", "concurrency"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag} must be >= 1 (leave it out for no limit), got {value}")
    models = None
    if args.models is not None:
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        if not models:
            raise ConfigError("--models must name at least one model id (leave it out for every model)")
    expires = None if args.expires is None else parse_time(args.expires, "--expires")
    return KeyPolicy(args.rpm, args.tpm, args.concurrency, models, expires, admin=args.admin)


def run_keys_command(args: argparse.Namespace, cfg: PlatformConfig | None) -> None:
    """Run ``aigc keys <action>`` (what :mod:`aigc.cli` calls)."""
    now = time.time()
    if args.action == "usage":
        return _usage(args, cfg)
    path = _file(args, cfg)
    if args.action == "add":
        policy = _policy(args)
        key = add_key(path, args.name, policy, now)
        print(f"[keys] added {args.name!r} to {path}; the key (shown only now, store it safely):")
        print(key)
        if policy.expired(now):
            print(f"[keys] note: it expired already ({format_time(policy.expires)})")
    elif args.action == "list":
        records = read_records(path)
        if not records:
            print(f"[keys] {path} has no keys (aigc keys add NAME)")
        for name, r in sorted(records.items()):
            p = r.policy
            limits = " ".join(f"{k}={v}" for k, v in (("rpm", p.rpm), ("tpm", p.tpm), ("concurrency", p.concurrency))
                              if v is not None) or "no limits"  # fmt: skip
            models = ",".join(p.models) if p.models is not None else "all models"
            expiry = "never expires" if p.expires is None else ("expired " if p.expired(now) else "expires ")
            expiry += format_time(p.expires) if p.expires is not None else ""
            print(f"{name}\t{limits}\t{models}\t{expiry}" + ("\tadmin" if p.admin else ""))
    elif args.action == "revoke":
        revoke_key(path, args.name)
        reload_s = cfg.serve.api_keys_reload_s if cfg is not None else 2.0
        print(f"[keys] revoked {args.name!r}: running servers refuse it within {reload_s:g}s")
    else:  # migrate
        names = migrate_keys_file(path, now)
        print(f"[keys] {path} now holds hashes only ({len(names)} key(s): {', '.join(names)})")


def _usage(args: argparse.Namespace, cfg: PlatformConfig | None) -> None:
    from aigc.serve.quota import cluster_usage

    app = cfg.serve.app_name if cfg is not None else "aigc"
    rows = cluster_usage(app, args.address)
    if not rows:
        print(f"[keys] no usage recorded yet for app {app!r} (only keys with limits are counted on the cluster)")
    print("key\trequests_1m\ttokens_1m\tin_flight\trequests_total\ttokens_total")
    for name, u in sorted(rows.items()):
        print(f"{name}\t{u['requests_1m']}\t{u['tokens_1m']}\t{u['in_flight']}\t{u['requests_total']}\t"
              f"{u['tokens_total']}")  # fmt: skip

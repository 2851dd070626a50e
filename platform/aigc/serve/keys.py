"""The keys file: names, SHA-256 hashes of the keys and per-key policies; never a key.

``aigc keys add NAME`` makes a key (``secrets.token_urlsafe(32)``: 256 random bits), prints it once and writes
only its hash here; ``aigc keys revoke NAME`` removes the entry; the ingress re-reads the file when it changes
(:class:`aigc.serve.auth.KeyStore`). The file is YAML::

    # aigc API keys: `aigc keys add|list|revoke` ...
    keys:
      team-a:
        sha256: 3f0c...            # hex digest of the key
        created: '2026-12-06T00:10:00Z'
        expires: '2027-01-01T00:00:00Z'   # optional; refused with 401 from then on
        rpm: 60                    # optional limits (aigc.serve.limits): requests per minute,
        tpm: 40000                 #   tokens per minute (prompt + completion),
        concurrency: 4             #   requests at once,
        models: [support-bot]      #   the models the key may use (a registered name covers its versions/aliases)
        admin: true                # optional: may load/unload adapters at runtime (POST/DELETE /v1/adapters)

Why a fast hash is enough: these keys are 256-bit random tokens, so nobody can search the key space from a
leaked hash, however fast the hash; slow hashes (bcrypt, argon2) exist for low-entropy passwords and would add
milliseconds to every request. Keys written by hand in the old plain format (``name: key``) are read by
:mod:`aigc.serve.auth`, hashed in memory, until ``aigc keys migrate`` rewrites the file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import yaml

from aigc import storage
from aigc.errors import ConfigError

__all__ = ["KeyPolicy", "KeyRecord", "add_key", "format_time", "hash_key", "parse_hashed", "parse_time",
           "read_records", "revoke_key", "write_records"]  # fmt: skip

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # names end up in logs and metric labels
_HEX = re.compile(r"^[0-9a-f]{64}$")
_HEADER = (
    "# aigc API keys: names, SHA-256 hashes of the keys and their policies; no key is stored here.\n"
    "# Edit with `aigc keys add NAME` / `aigc keys revoke NAME`; the server re-reads this file when it changes.\n"
)
_LIMITS = ("rpm", "tpm", "concurrency")


@dataclass(frozen=True)
class KeyPolicy:
    """What one key may do. None = no limit (every model, no expiry)."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    models: tuple[str, ...] | None = None
    expires: float | None = None  # epoch seconds
    admin: bool = False  # may load and unload adapters on the running servers (POST/DELETE /v1/adapters)

    @property
    def limited(self) -> bool:
        """Whether requests of this key need counting (requests, tokens or concurrency)."""
        return any(getattr(self, k) is not None for k in _LIMITS)

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def allows(self, model: str) -> bool:
        """Whether ``model`` (as the client wrote it) is one of the allowed models, or a version or alias of one
        (``support-bot`` allows ``support-bot:v3`` and ``support-bot:stable``)."""
        return self.models is None or model in self.models or model.partition(":")[0] in self.models

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in _LIMITS if getattr(self, k) is not None}
        if self.models is not None:
            out["models"] = list(self.models)
        if self.expires is not None:
            out["expires"] = format_time(self.expires)
        if self.admin:
            out["admin"] = True
        return out


@dataclass(frozen=True)
class KeyRecord:
    """One key as stored: its name, the hex SHA-256 of the key, its policy."""

    name: str
    sha256: str
    policy: KeyPolicy = field(default_factory=KeyPolicy)
    created: float | None = None


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key (see the module doc for why a fast hash is right here)."""
    return hashlib.sha256(key.encode()).hexdigest()


def format_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any, what: str) -> float:
    """A date (``2027-01-01``, midnight UTC) or an ISO date-time (UTC unless it says) -> epoch seconds."""
    if isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, dt.date):
        when = dt.datetime(value.year, value.month, value.day)
    else:
        try:
            when = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"{what}: {value!r} is not a date like 2027-01-31 or 2027-01-31T12:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def _policy(entry: dict[str, Any], where: str) -> KeyPolicy:
    values: dict[str, Any] = {}
    for k in _LIMITS:
        v = entry.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{where}: {k} must be a whole number >= 1, got {v!r}")
        values[k] = v
    models = entry.get("models")
    if models is not None:
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise ConfigError(f"{where}: models must be a non-empty list of model ids, got {models!r}")
        values["models"] = tuple(models)
    if entry.get("expires") is not None:
        values["expires"] = parse_time(entry["expires"], f"{where}: expires")
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise ConfigError(f"{where}: admin must be true or false, got {admin!r}")
    return KeyPolicy(**values, admin=admin)


def parse_hashed(text: str, source: str) -> dict[str, KeyRecord] | None:
    """The records of a keys file in the hashed format, or None when ``text`` is not in it (the old plain
    ``name: key`` format, which :mod:`aigc.serve.auth` reads).

    Raises:
        ConfigError: a hashed file with a bad entry; the message names the entry and the field.
    """
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if not (isinstance(loaded, dict) and set(loaded) == {"keys"} and isinstance(loaded["keys"], (dict, type(None)))):
        return None
    records: dict[str, KeyRecord] = {}
    allowed = {"sha256", "created", "expires", "models", "admin", *_LIMITS}
    for name, entry in (loaded["keys"] or {}).items():
        where = f"{source}: key {name!r}"
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(f"{source}: key name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if not isinstance(entry, dict) or not _HEX.match(str(entry.get("sha256", ""))):
            raise ConfigError(f"{where} needs sha256: the 64-character hex SHA-256 of the key (aigc keys add)")
        unknown = set(entry) - allowed
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        created = entry.get("created")
        records[name] = KeyRecord(name, entry["sha256"], _policy(entry, where),
                                  None if created is None else parse_time(created, f"{where}: created"))  # fmt: skip
    digests = [r.sha256 for r in records.values()]
    if len(set(digests)) != len(digests):
        raise ConfigError(f"{source}: two names hold the same key; revoke one of them")
    return records


def read_records(path: str) -> dict[str, KeyRecord]:
    """The records of the hashed keys file at ``path`` ({} when it does not exist yet).

    Raises:
        ConfigError: the file holds plain keys (the old format: ``aigc keys migrate`` rewrites it) or is malformed.
    """
    if not storage.exists(path):
        return {}
    records = parse_hashed(storage.read_text(path), path)
    if records is None:
        raise ConfigError(
            f"{path} is not a hashed keys file (it holds plain 'name: key' entries, or is not YAML): run "
            f"`aigc keys migrate --file {path}` to store hashes instead of the keys"
        )
    return records


def write_records(path: str, records: dict[str, KeyRecord]) -> None:
    """Write the file whole (atomically: a replica re-reading it sees the old or the new file, never half)."""
    out: dict[str, Any] = {}
    for name, r in sorted(records.items()):
        entry: dict[str, Any] = {"sha256": r.sha256}
        if r.created is not None:
            entry["created"] = format_time(r.created)
        entry.update(r.policy.describe())
        out[name] = entry
    storage.write_text(path, _HEADER + yaml.safe_dump({"keys": out}, sort_keys=False))


def add_key(path: str, name: str, policy: KeyPolicy, now: float) -> str:
    """Make a new key named ``name``, store its hash and policy in ``path``, and return the key (shown once).

    Raises:
        ConfigError: a bad name, or the name is taken (revoke it first to rotate).
    """
    if not NAME.match(name):
        raise ConfigError(f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    records = read_records(path)
    if name in records:
        raise ConfigError(
            f"{path} already has a key named {name!r}: to rotate, add the new key under another name and revoke "
            f"this one once its clients moved (aigc keys revoke {name})"
        )
    key = "sk-aigc-" + secrets.token_urlsafe(32)
    records[name] = KeyRecord(name, hash_key(key), policy, now)
    write_records(path, records)
    return key


def revoke_key(path: str, name: str) -> None:
    """Remove the key named ``name`` from ``path``.

    Raises:
        ConfigError: no such key.
    """
    records = read_records(path)
    if name not in records:
        raise ConfigError(f"{path} has no key named {name!r} (aigc keys list shows the names)")
    del records[name]
    write_records(path, records)

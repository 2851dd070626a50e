"""API keys for the OpenAI endpoint: what a key is, reading keys where the ingress runs (and re-reading the keys
file when it changes), and where serving without keys is allowed. The middleware that checks
``Authorization: Bearer`` is :mod:`aigc.serve.middleware`; the keys file's format is :mod:`aigc.serve.keys`.

Keys have names (``ci``, ``team-a``...): the name of the caller's key is put on the request
(``request.state.key_name``) for logs and metrics; the key itself is never logged, printed or put in the
config (the config holds only the path of a keys file and/or the name of an environment variable). Keys are
read in the ingress replica, so a Serve deployment passes them through the replica's environment or a file
on its node, never through the Serve config or ``.bind()`` arguments (which the Serve dashboard shows).

Two sources, either or both:

* ``serve.api_keys_file``: the hashed keys file ``aigc keys add`` writes (names, SHA-256 hashes, policies),
  re-read when it changes (:class:`KeyStore`); the old plain format (``name: key`` YAML/JSON or ``name:key``
  lines) is still read, with a warning, until ``aigc keys migrate`` rewrites it;
* ``serve.api_keys_env``: the name of a variable holding ``name:key,name2:key2`` (a Kubernetes Secret; never on
  disk; these keys have no limits).

``serve.auth`` decides: ``keys`` = keys are required (none found is an error); ``none`` = no key is checked (a
warning says so at start); ``auto`` (default) = keys are checked when a source is configured, and otherwise the
server must listen on a loopback address only (:func:`check_exposure`, given the address Serve's HTTP proxy
really binds), and answers only clients whose requests carry no forwarding headers.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import yaml

from aigc import storage
from aigc.errors import ConfigError
from aigc.serve.keys import NAME, KeyPolicy, KeyRecord, hash_key, parse_hashed, write_records

__all__ = [
    "ApiKeys",
    "AuthMode",
    "KeyStore",
    "check_exposure",
    "is_loopback",
    "load_api_keys",
    "migrate_keys_file",
    "parse_keys_env",
    "parse_keys_text",
    "proxy_bind_host",
    "resolve_api_keys",
]

logger = logging.getLogger("ray.serve")

AuthMode = Literal["auto", "keys", "none"]
MIN_KEY_CHARS = 16  # a short key can be guessed; 16 random characters is the least we accept
_NAME = NAME
NO_AUTH_WARNING = (
    "serve.auth is 'none': requests are not authenticated and have no per-key limits; anyone who reaches the "
    "endpoint can use it (keep it behind an authenticating proxy)"
)


class ApiKeys:
    """A set of named keys, held as SHA-256 hashes with their policies. :meth:`match` compares the presented
    token's hash with every stored hash in constant time."""

    def __init__(self, records: dict[str, KeyRecord], allow_empty: bool = False):
        if not records and not allow_empty:  # at start, no key is a configuration error (fail closed)
            raise ConfigError("no API keys given")
        self._records = list(records.values())

    @classmethod
    def from_plain(cls, keys: dict[str, str]) -> ApiKeys:
        """Keys given in plain text (the environment variable, an old-format file): hashed here, no policy."""
        return cls({name: KeyRecord(name, hash_key(key)) for name, key in keys.items()})

    @property
    def names(self) -> list[str]:
        return [r.name for r in self._records]

    def policy(self, name: str | None) -> KeyPolicy:
        """The policy of the key named ``name`` (no limits for an unknown name or None)."""
        return next((r.policy for r in self._records if r.name == name), KeyPolicy())

    def record(self, token: str) -> KeyRecord | None:
        """The record of the key equal to ``token``, or None. Every hash is compared, so the time taken does
        not tell which key matched."""
        presented = hash_key(token).encode()
        found = None
        for r in self._records:
            if hmac.compare_digest(presented, r.sha256.encode()) and found is None:
                found = r
        return found

    def match(self, token: str) -> str | None:
        """The name of the key equal to ``token``, or None."""
        r = self.record(token)
        return None if r is None else r.name

    def __repr__(self) -> str:  # never the hashes either
        return f"ApiKeys(names={self.names})"


# ------------------------------------------------------------------------------------------------- parsing
def _add(keys: dict[str, str], name: Any, key: Any, source: str) -> None:
    """Validate one entry; messages name the entry, never show the key."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{source}: key name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{source}: the key named {name!r} is empty or not text")
    if len(key) < MIN_KEY_CHARS or any(c.isspace() or c == "," for c in key):
        raise ConfigError(
            f"{source}: the key named {name!r} must be at least {MIN_KEY_CHARS} characters without spaces or "
            "commas (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    if name in keys:
        raise ConfigError(f"{source}: the key name {name!r} is given twice")
    if any(hmac.compare_digest(key.encode(), k.encode()) for k in keys.values()):
        raise ConfigError(f"{source}: the key named {name!r} is also given under another name")
    keys[name] = key


def _pairs(entries: Iterable[str], source: str, what: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for i, entry in enumerate(entries, start=1):
        name, sep, key = entry.partition(":")
        if not sep:
            raise ConfigError(f"{source}: {what} {i} is not of the form name:key")
        _add(keys, name.strip(), key.strip(), source)
    return keys


def parse_keys_env(value: str, source: str = "environment") -> dict[str, str]:
    """``name:key,name2:key2`` (the value of ``serve.api_keys_env``'s variable) -> ``{name: key}``."""
    return _pairs([e for e in value.split(",") if e.strip()], source, "entry")


def parse_keys_text(text: str, source: str = "keys file") -> dict[str, str]:
    """A keys file's text -> ``{name: key}``: a YAML/JSON mapping, or one ``name:key`` per line.

    Raises:
        ConfigError: a malformed file or entry; the message gives the line or the key's name, never a key.
    """
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # the parser's message quotes the line: give its number only
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{source} is neither a YAML/JSON mapping nor name:key lines{where}") from None
    if isinstance(loaded, dict):
        keys: dict[str, str] = {}
        for name, key in loaded.items():
            _add(keys, name, key, source)
        return keys
    lines = [ln.strip() for ln in text.splitlines()]
    return _pairs([ln for ln in lines if ln and not ln.startswith("#")], source, "line")


def _file_records(file: str) -> dict[str, KeyRecord]:
    source = f"serve.api_keys_file {file}"
    text = storage.read_text(file)
    records = parse_hashed(text, source)
    if records is not None:
        return records
    plain = parse_keys_text(text, source)  # the old format: hashed here, in memory
    logger.warning("%s holds plain keys (the old format): run `aigc keys migrate --file %s` to store only their "
                   "hashes", source, file)  # fmt: skip
    return {name: KeyRecord(name, hash_key(key)) for name, key in plain.items()}


def load_api_keys(file: str | None = None, env: str | None = None) -> dict[str, KeyRecord]:
    """Read the keys of a keys file (local path or URI) and/or an environment variable; names and keys must
    not repeat.

    Raises:
        ConfigError: a source is missing or malformed; the message names the file or variable.
    """
    records: dict[str, KeyRecord] = {}
    if file:
        if not storage.exists(file):
            raise ConfigError(f"serve.api_keys_file: {file} does not exist where the server runs")
        records.update(_file_records(file))
    if env:
        if env not in os.environ:
            raise ConfigError(f"serve.api_keys_env: the variable {env} is not set where the server runs")
        for name, key in parse_keys_env(os.environ[env], f"variable {env}").items():
            if name in records:
                raise ConfigError(f"variable {env}: the key name {name!r} is given twice")
            if any(hmac.compare_digest(hash_key(key), r.sha256) for r in records.values()):
                raise ConfigError(f"variable {env}: the key named {name!r} is also given under another name")
            records[name] = KeyRecord(name, hash_key(key))
    return records


def resolve_api_keys(mode: AuthMode, file: str | None = None, env: str | None = None) -> ApiKeys | None:
    """The keys to check, or None when requests are not authenticated (``none``, or ``auto`` without a source).

    A configured source that yields no key is an error in every mode but ``none``: the server fails closed.
    """
    if mode == "none":
        return None
    if not (file or env):
        if mode == "keys":
            raise ConfigError("serve.auth is 'keys' but neither serve.api_keys_file nor serve.api_keys_env is set")
        return None
    keys = load_api_keys(file, env)
    if not keys:
        raise ConfigError(f"no API keys found in {' and '.join(s for s in (file, env and f'${env}') if s)}")
    return ApiKeys(keys)


def migrate_keys_file(path: str, now: float) -> list[str]:
    """Rewrite an old-format keys file (plain ``name: key``) as the hashed file; returns the names.

    Raises:
        ConfigError: the file is missing, malformed, or already hashed.
    """
    if not storage.exists(path):
        raise ConfigError(f"{path} does not exist")
    text = storage.read_text(path)
    if parse_hashed(text, path) is not None:
        raise ConfigError(f"{path} already holds hashes only; nothing to migrate")
    plain = parse_keys_text(text, path)
    write_records(path, {n: KeyRecord(n, hash_key(k), KeyPolicy(), now) for n, k in plain.items()})
    return list(plain)


class KeyStore:
    """One replica's keys, re-read when the keys file changes.

    :meth:`current` looks at the file's modification time and size at most every ``reload_s`` seconds (on a
    request, no thread of its own) and re-reads it when either moved, so a key added or revoked with
    ``aigc keys`` is in force within ``reload_s``, without a restart. A file that is malformed or gone at a
    re-read leaves the keys read before in force (logged as an error): revoke a key with ``aigc keys revoke``,
    not by deleting the file. A file whose every key was revoked refuses every request. The first read happens
    in the constructor and raises, so a replica never starts without its keys.

    Raises:
        ConfigError: from the constructor, as :func:`resolve_api_keys`.
    """

    def __init__(self, mode: AuthMode, file: str | None = None, env: str | None = None, reload_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self._args, self._file, self._reload_s, self._clock = (mode, file, env), file, reload_s, clock
        self._stamp = self._file_stamp()
        self._keys = resolve_api_keys(mode, file, env)
        self._checked = clock()
        self._watch = mode != "none" and file is not None

    @classmethod
    def fixed(cls, keys: ApiKeys | None) -> KeyStore:
        """A store that always answers ``keys`` (tests, embedding)."""
        store = cls("none")
        store._keys = keys
        return store

    def _file_stamp(self) -> tuple[int, int] | None:
        if not self._file:
            return None
        try:
            fs, path = storage.filesystem(self._file)
            info = fs.get_file_info(path)
        except Exception:  # unreachable storage: treated as "unchanged" until it answers
            return self._stamp if hasattr(self, "_stamp") else None
        return (info.mtime_ns or 0, info.size or 0)

    def current(self) -> ApiKeys | None:
        """The keys in force (None = requests are not authenticated)."""
        if self._watch and self._clock() - self._checked >= self._reload_s:
            self._checked = self._clock()
            stamp = self._file_stamp()
            if stamp != self._stamp:
                try:  # every key revoked: every request is refused (not the keys read before)
                    self._keys = ApiKeys(load_api_keys(*self._args[1:]), allow_empty=True)
                    self._stamp = stamp
                    logger.info("re-read the keys file %s: %d key(s)", self._file, len(self._keys.names))
                except ConfigError as exc:  # keep the keys in force; try again next period
                    logger.error("the keys file could not be re-read (%s); the keys read before stay in force", exc)
        return self._keys


# ----------------------------------------------------------------------------------------------- exposure
def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (``127.x``, ``::1``, ``localhost``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[] ")).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to anything
        return False


def proxy_bind_host(default: str) -> str:
    """The address Serve's HTTP proxy binds (``http_options.host`` of the running Serve instance, which a Serve
    YAML sets), asked from the Serve controller; ``default`` when no Serve instance runs (yet)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    if not ray.is_initialized():
        return default
    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return ray.get(controller.get_http_config.remote(), timeout=30).host
    except ValueError:  # no controller: Serve is not started
        return default


def check_exposure(host: str, mode: AuthMode, file: str | None, env: str | None, what: str = "serve.host") -> None:
    """Refuse to serve without keys on an address other machines can reach, unless ``auth: none`` says so
    (which logs :data:`NO_AUTH_WARNING`).

    Args:
        host: the address the HTTP proxy binds (or will bind).
        what: where ``host`` comes from, for the message (``serve.host``, or the running proxy's
            ``http_options.host``).

    Raises:
        ConfigError: ``host`` is not loopback, ``mode`` is ``auto`` and no key source is configured.
    """
    if mode == "none":
        logger.warning(NO_AUTH_WARNING)
        return
    if mode == "auto" and not (file or env) and not is_loopback(host):
        raise ConfigError(
            f"{what} is {host!r}, reachable from other machines, but no API keys are configured: set "
            "serve.api_keys_file or serve.api_keys_env (see docs/operations.md, Security), or set "
            "serve.auth=none to serve without keys on purpose (e.g. behind an authenticating proxy)"
        )

"""API keys for the OpenAI endpoint: what a key is, reading keys where the ingress runs, and where serving
without keys is allowed. The middleware that checks ``Authorization: Bearer`` is :mod:`aigc.serve.middleware`.

Keys have names (``ci``, ``team-a``...): the name of the caller's key is put on the request
(``request.state.key_name``) for logs and metrics; the key itself is never logged, printed or put in the
config (the config holds only the path of a keys file and/or the name of an environment variable). Keys are
read in the ingress replica, so a Serve deployment passes them through the replica's environment or a file
on its node, never through the Serve config or ``.bind()`` arguments (which the Serve dashboard shows).

Two sources, either or both:

* ``serve.api_keys_file``: YAML or JSON mapping ``name: key``, or one ``name:key`` per line (``#`` comments);
* ``serve.api_keys_env``: the name of a variable holding ``name:key,name2:key2``.

``serve.auth`` decides: ``keys`` = keys are required (none found is an error); ``none`` = no key is checked;
``auto`` (default) = keys are checked when a source is configured, and otherwise the server must listen on a
loopback address only (:func:`check_exposure` refuses anything else before any Ray work).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from collections.abc import Iterable
from typing import Any, Literal

import yaml

from aigc import storage
from aigc.errors import ConfigError

__all__ = [
    "ApiKeys",
    "AuthMode",
    "check_exposure",
    "is_loopback",
    "load_api_keys",
    "parse_keys_env",
    "parse_keys_text",
    "resolve_api_keys",
]

AuthMode = Literal["auto", "keys", "none"]
MIN_KEY_CHARS = 16  # a short key can be guessed; 16 random characters is the least we accept
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # names end up in logs and metric labels


class ApiKeys:
    """A set of named keys; :meth:`match` compares a presented token with every key in constant time."""

    def __init__(self, keys: dict[str, str]):
        if not keys:
            raise ConfigError("no API keys given")
        self._keys = [(name, key.encode()) for name, key in keys.items()]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._keys]

    def match(self, token: str) -> str | None:
        """The name of the key equal to ``token``, or None. Every key is compared, so the time taken does not
        tell which key (or how much of one) matched."""
        presented = token.encode()
        found = None
        for name, key in self._keys:
            if hmac.compare_digest(presented, key) and found is None:
                found = name
        return found

    def __repr__(self) -> str:  # never the keys themselves
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


def load_api_keys(file: str | None = None, env: str | None = None) -> dict[str, str]:
    """Read the keys of a keys file (local path or URI) and/or an environment variable; names must not repeat.

    Raises:
        ConfigError: a source is missing or malformed; the message names the file or variable.
    """
    keys: dict[str, str] = {}
    if file:
        if not storage.exists(file):
            raise ConfigError(f"serve.api_keys_file: {file} does not exist where the server runs")
        for name, key in parse_keys_text(storage.read_text(file), f"serve.api_keys_file {file}").items():
            _add(keys, name, key, f"serve.api_keys_file {file}")
    if env:
        if env not in os.environ:
            raise ConfigError(f"serve.api_keys_env: the variable {env} is not set where the server runs")
        for name, key in parse_keys_env(os.environ[env], f"variable {env}").items():
            _add(keys, name, key, f"variable {env}")
    return keys


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


# ----------------------------------------------------------------------------------------------- exposure
def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (``127.x``, ``::1``, ``localhost``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[] ")).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to anything
        return False


def check_exposure(host: str, mode: AuthMode, file: str | None, env: str | None) -> None:
    """Refuse to serve without keys on an address other machines can reach, unless ``auth: none`` says so.

    Raises:
        ConfigError: ``host`` is not loopback, ``mode`` is ``auto`` and no key source is configured.
    """
    if mode == "auto" and not (file or env) and not is_loopback(host):
        raise ConfigError(
            f"serve.host is {host!r}, reachable from other machines, but no API keys are configured: set "
            "serve.api_keys_file or serve.api_keys_env (see docs/operations.md, Security), or set "
            "serve.auth=none to serve without keys on purpose (e.g. behind an authenticating proxy)"
        )

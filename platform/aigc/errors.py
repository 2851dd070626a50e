"""One error family for the whole platform.

Every error the platform raises on purpose derives from :class:`AigcError`. The CLI prints any of them as one
line and exits non-zero (no traceback: the message says what was wrong and what to do next); anything else is
a bug and keeps its traceback. The HTTP mapping of serving errors lives in the ingress alone
(:mod:`aigc.serve.ingress`): nothing here knows about status codes.

Errors cross process boundaries (Ray pickles an actor's exception into the caller), so every field travels in
``args`` and each class rebuilds from them.
"""

from __future__ import annotations

__all__ = [
    "AdapterLoadError",
    "AigcError",
    "ModelUnavailableError",
    "ClusterError",
    "ConfigError",
    "DataError",
    "GenerationError",
    "InvalidRequestError",
    "LockHeldError",
    "ModelNotFoundError",
    "RegistryError",
    "RequestTimeoutError",
    "ServingError",
    "ServiceUnavailableError",
    "StorageError",
    "TrainingError",
]


class AigcError(Exception):
    """Base of every error the platform raises on purpose; ``str(err)`` is the whole user-facing message."""

    def __init__(self, message: str, *args: object):
        super().__init__(message, *args)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(AigcError, ValueError):
    """A config file, override or Serve ``args`` is invalid; the message names the field and the reason."""


class DataError(AigcError, ValueError):
    """Input data cannot be used at all (missing file, unknown format, wrong columns, nothing kept)."""


class StorageError(AigcError, OSError):
    """A path or URI cannot be read or written (unknown scheme, missing bucket, refused deletion)."""


class RegistryError(AigcError, ValueError):
    """A registry name, version or entry is invalid or missing."""


class ClusterError(AigcError, RuntimeError):
    """A Ray cluster cannot be reached, or refused a job request (bad token, unknown job id)."""


class LockHeldError(AigcError, RuntimeError):
    """Another live process holds the lock this command needs (one pipeline per output_dir); the message names
    that process (host, pid, since when) and what to do."""


class TrainingError(AigcError, RuntimeError):
    """A training run or sweep failed in a way the user can act on (no trial reported its metric...)."""


class ModelUnavailableError(AigcError, OSError):
    """The base model cannot be had: a hub id offline and not cached, gated or private without a token, a revision
    the hub does not know, or a local copy missing its files. Raised on the driver before any Ray work."""


class ServingError(AigcError):
    """Base of the errors a generation request can end with.

    Args:
        message: what went wrong, for the client.
        param: the request field at fault, if any (OpenAI's ``error.param``).
        code: a machine-readable code (OpenAI's ``error.code``), e.g. ``context_length_exceeded``.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message, param, code)
        self.param, self.code = param, code


class InvalidRequestError(ServingError, ValueError):
    """The request cannot be served as asked (prompt too long, bad parameter)."""


class ModelNotFoundError(ServingError, LookupError):
    """The request's model id names neither the base model nor a registered adapter."""


class AdapterLoadError(ServingError, RuntimeError):
    """A registered adapter could not be loaded (corrupt files, wrong base model, unsupported type)."""


class GenerationError(ServingError, RuntimeError):
    """One request's generation failed on the server (non-finite scores, a detokenizer error); its batch goes on."""


class RequestTimeoutError(ServingError, TimeoutError):
    """The request did not finish before its deadline (``serve.request_timeout_s``); its batch slot is freed."""


class ServiceUnavailableError(ServingError):
    """A temporary condition the client should retry after a moment (storage outage, replica lost, restarting)."""

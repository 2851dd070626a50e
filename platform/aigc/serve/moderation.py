"""Content safety for the endpoint: a policy checked on prompts before generation and on answers as they stream.

A *policy* is any object with ``check(text) -> Flag | None``. The built-in :class:`RulePolicy` flags text that
matches a category's regular expressions (``serve.moderation.categories`` in the config). A classifier plugs in
through ``serve.moderation.classifier: "package.module:factory"``: the factory is called once per ingress
replica with no arguments and returns a policy; rules are checked first, then the classifier.

A flagged prompt is refused (400, ``code: content_filter``); a flagged answer stops there with
``finish_reason: "content_filter"``, as OpenAI's API does. While streaming, the last ``holdback_chars``
characters stay unsent until more text shows they are clean, so a flagged phrase split over two tokens is
never half sent (keep ``holdback_chars`` at least as long as the longest phrase a rule can match).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

from aigc.errors import ConfigError

__all__ = ["Flag", "OutputGuard", "Policy", "RulePolicy", "load_policy"]


class Flag(NamedTuple):
    """Why text was flagged: the category and where in the text (``start``/``end``, characters)."""

    category: str
    start: int = 0
    end: int = 0


class Policy(Protocol):
    def check(self, text: str) -> Flag | None:
        """The first flagged span of ``text``, or None when it is acceptable."""


class RulePolicy:
    """Regular expressions per category, matched case-insensitively; the earliest match wins.

    Raises:
        ConfigError: a pattern does not compile (the message names the category and pattern).
    """

    def __init__(self, categories: Mapping[str, Sequence[str]]):
        self._rules: list[tuple[str, re.Pattern[str]]] = []
        for category, patterns in categories.items():
            for p in patterns:
                try:
                    self._rules.append((category, re.compile(p, re.IGNORECASE)))
                except re.error as exc:
                    raise ConfigError(f"serve.moderation.categories.{category}: bad pattern {p!r}: {exc}") from None

    def check(self, text: str) -> Flag | None:
        best: Flag | None = None
        for category, rule in self._rules:
            m = rule.search(text)
            if m and (best is None or m.start() < best.start):
                best = Flag(category, m.start(), m.end())
        return best


class _Chain:
    def __init__(self, policies: Sequence[Policy]):
        self._policies = list(policies)

    def check(self, text: str) -> Flag | None:
        for p in self._policies:
            flag = p.check(text)
            if flag is not None:
                return flag
        return None


def load_policy(categories: Mapping[str, Sequence[str]], classifier: str | None = None) -> Policy | None:
    """The policy a config describes, or None when it has no rules and no classifier.

    Raises:
        ConfigError: a rule does not compile, or the classifier cannot be imported or built.
    """
    policies: list[Policy] = []
    if any(categories.values()):
        policies.append(RulePolicy(categories))
    if classifier:
        module, _, attr = classifier.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
            policy = factory()
        except Exception as exc:
            raise ConfigError(f"serve.moderation.classifier {classifier!r} could not be loaded: {exc}") from None
        if not callable(getattr(policy, "check", None)):
            raise ConfigError(f"serve.moderation.classifier {classifier!r} returned an object without check(text)")
        policies.append(policy)
    return _Chain(policies) if policies else None


class OutputGuard:
    """Checks a streamed answer piece by piece; holds back a tail that could still become a flagged phrase.

    Each push re-checks only the held-back tail plus the new piece, so a long answer costs O(length) in all.
    """

    def __init__(self, policy: Policy, holdback_chars: int = 64):
        self.policy, self.holdback = policy, holdback_chars
        self._pending = ""  # checked as part of the window, not sent yet
        self._context = ""  # the tail already sent (kept so a phrase across the boundary is still seen)
        self.flag: Flag | None = None

    def push(self, piece: str) -> str:
        """Text safe to send now; after a flag, ``flag`` is set and nothing more is returned."""
        if self.flag is not None:
            return ""
        self._pending += piece
        window = self._context + self._pending
        flag = self.policy.check(window)
        if flag is not None:
            self.flag = flag
            safe = window[: max(flag.start, len(self._context))][len(self._context) :]
            self._pending = ""
            return safe
        cut = max(0, len(self._pending) - self.holdback)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        self._context = (self._context + out)[-self.holdback :] if self.holdback else ""
        return out

    def flush(self) -> str:
        """The held-back tail at the end of an answer (already checked, so clean unless flagged)."""
        out, self._pending = ("" if self.flag is not None else self._pending), ""
        return out

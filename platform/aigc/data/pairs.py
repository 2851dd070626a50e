"""Preference rows (``data.preference``): one prompt and two answers to it, the chosen one and the rejected one.

The shapes the ecosystem writes (LLaMA-Factory's ``ranking: true`` datasets, TRL's conversational preference sets):

- alpaca: the prompt is ``instruction``, ``input?``, ``system?``, ``history?``; ``chosen``/``rejected`` are strings.
- sharegpt: the prompt is ``conversations`` ending with the user's turn; each answer is ``{from: gpt, value}``, a
  one-turn list of it, or a string.
- messages: the prompt is ``messages`` ending with the user's turn; each answer is ``{role: assistant, content}``,
  a one-turn list of it, or a string.

Each answer completes the prompt into a conversation that goes through the SFT row checks
(:func:`aigc.data.formats.to_example`), so a pair is rejected for the same reasons a row is (``missing_field``,
``empty_response`` ...) and for two of its own, both ``bad_pair``: a prompt that already ends with an answer, and
two answers that are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aigc.data.formats import Example, RowError, conversation_key, to_example

__all__ = ["PAIR_FIELDS", "Pair", "pair_key", "to_pair"]

PAIR_FIELDS = ("chosen", "rejected")
_TURNS = {  # format -> (conversation field, role key, text key, the assistant's role)
    "sharegpt": ("conversations", "from", "value", "gpt"),
    "messages": ("messages", "role", "content", "assistant"),
}
_ASSISTANT = {"gpt", "assistant"}


@dataclass(frozen=True)
class Pair:
    """The prompt completed by each answer: two conversations that differ in their last (assistant) turn only."""

    chosen: Example
    rejected: Example


def _answer_turn(value: Any, side: str, fmt: str) -> dict[str, Any]:
    """The answer as one turn of ``fmt``'s conversation list."""
    _, role_key, text_key, role = _TURNS[fmt]
    if isinstance(value, list):  # TRL's conversational shape: a list holding the one assistant turn
        if len(value) != 1:
            raise RowError("bad_pair", f"field {side!r} must be one assistant turn, got a list of {len(value)}")
        value = value[0]
    if isinstance(value, str):
        return {role_key: role, text_key: value}
    if not isinstance(value, dict):
        raise RowError("wrong_type", f"field {side!r} must be a string or a turn, got {type(value).__name__}")
    if value.get(role_key, role) not in _ASSISTANT:
        raise RowError("bad_role", f"{side}.{role_key} must be the assistant's, got {value.get(role_key)!r}")
    return {**value, role_key: value.get(role_key, role)}


def _completed(row: dict[str, Any], fmt: str, side: str) -> dict[str, Any]:
    """``row`` as an SFT row of ``fmt`` whose last answer is ``row[side]``."""
    if row.get(side) is None:
        raise RowError("missing_field", f"missing field {side!r}")
    if fmt == "alpaca":
        if not isinstance(row[side], str):
            raise RowError("wrong_type", f"field {side!r} must be a string, got {type(row[side]).__name__}")
        return {**row, "output": row[side]}
    key, role_key, _, _ = _TURNS[fmt]
    prompt = row.get(key)
    if not isinstance(prompt, list):  # to_example names a missing or malformed list
        return {**row, key: prompt}
    if prompt and isinstance(prompt[-1], dict) and prompt[-1].get(role_key) in _ASSISTANT:
        raise RowError("bad_pair", f"{key!r} must end with the user's turn: the answers are 'chosen' and 'rejected'")
    return {**row, key: [*prompt, _answer_turn(row[side], side, fmt)]}


def to_pair(row: dict[str, Any], fmt: str, system_prompt: str | None = None) -> Pair:
    """Validate one preference record of ``fmt`` (alpaca, sharegpt, messages) and return its two conversations.

    Raises:
        RowError: the row does not fit (the reasons of :func:`aigc.data.formats.to_example`, and ``bad_pair``).
        ValueError: ``fmt`` has no preference shape (text).
    """
    if fmt not in ("alpaca", *_TURNS):
        raise ValueError(f"format {fmt!r} has no preference pairs; use alpaca, sharegpt or messages")
    chosen, rejected = (to_example(_completed(row, fmt, side), fmt, system_prompt) for side in PAIR_FIELDS)
    if chosen.turns[-1] == rejected.turns[-1]:
        raise RowError("bad_pair", "'chosen' and 'rejected' are the same answer: the pair teaches nothing")
    return Pair(chosen=chosen, rejected=rejected)


def pair_key(pair: Pair) -> int:
    """The exact-dedup key of a pair: its prompt and both answers, normalized (see ``conversation_key``)."""
    return conversation_key(Example(turns=[*pair.chosen.turns, pair.rejected.turns[-1]], tools=pair.chosen.tools))

"""The rows of ``generate.input``: every record read once on the driver, numbered, and turned into a prompt per row.

Reading goes through the preprocessor's listing and record readers (:mod:`aigc.data.input_files`,
:mod:`aigc.data.file_records`): the same files, globs, URIs and formats. A record becomes a prompt on the actor
(:func:`to_prompt`), so a bad row fails there alone and is quarantined with its reason, never the run:

- a data format (alpaca, messages, sharegpt, text): the row goes through the preprocessor's checks
  (:func:`aigc.data.formats.to_example`); the conversation without its last answer is the prompt and that answer
  the reference (what ``aigc eval`` scores against). A row with no answer yet is a prompt without reference.
- ``prompt``: the ``generate.prompt_column`` text as one user turn (the chat template, as the chat API does).
- ``text``: the text is a raw completion prompt (no template).

Cost: the records (not the model's outputs) are held in the driver's memory, one JSON string each; row numbers
are what makes a run resumable (:mod:`aigc.batch.parts`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import islice
from typing import Any

from aigc import storage
from aigc.config import DataConfig
from aigc.data.file_records import iter_records
from aigc.data.formats import RowError, parse_record, to_example
from aigc.data.input_files import list_input_files
from aigc.errors import ConfigError, DataError
from aigc.serve.engine import Prompt
from aigc.serve.engine.tool_prompts import ToolPrompt

__all__ = ["PromptRow", "detect_format", "read_rows", "to_prompt"]

_TURNS = {  # format -> (conversation field, role key, text key, the assistant's role)
    "messages": ("messages", "role", "content", "assistant"),
    "sharegpt": ("conversations", "from", "value", "gpt"),
}
_PLACEHOLDER = "\x00"  # an answer slot filled in so that a prompt-only row passes the SFT row checks


@dataclass(frozen=True)
class PromptRow:
    """One row ready for the engine: the prompt, how it is shown in the output, and the reference answer."""

    prompt: Prompt
    shown: str  # the last user turn (or the raw text): the output's ``prompt`` column
    messages: list[dict[str, Any]] | None  # the whole prompt conversation (None for raw text)
    reference: str | None


def _files(path: str, what: str) -> list[str]:
    try:
        return [f.path for f in list_input_files(DataConfig(path=path))]
    except DataError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def read_rows(path: str, limit: int | None = None, what: str = "generate.input") -> list[str]:
    """Every record of the files at ``path`` as a JSON string (a record that cannot be read is kept as
    ``{"__read_error__": reason, "__detail__": ...}`` and quarantined by :func:`to_prompt`), at most ``limit``.

    Raises:
        ConfigError: ``path`` names no readable input (the message names ``what``).
    """

    def records() -> Any:
        for file in _files(path, what):
            fs, inner = storage.filesystem(file)
            opened = fs.open_input_file(inner) if file.endswith(".parquet") else fs.open_input_stream(inner)
            with opened as f:
                for raw, error, detail in iter_records(f, file):
                    yield raw if not error else json.dumps({"__read_error__": error, "__detail__": detail})

    return list(islice(records(), limit))


def detect_format(raws: list[str], fmt: str, prompt_column: str, pairs: bool = False) -> str:
    """``fmt``, or for ``auto`` the format the first parsable record's fields name.

    Raises:
        ConfigError: ``auto`` and no record names a known format.
    """
    if fmt != "auto":
        return fmt
    for raw in raws[:20]:
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or "__read_error__" in rec:
            continue
        for field, name in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca")):
            if field in rec:
                return name
        if not pairs and prompt_column in rec:
            return "prompt"
        if not pairs and "text" in rec:
            return "text"
        break
    key = "generate.eval_pairs_format" if pairs else "generate.format"
    kinds = "messages, conversations or instruction" + ("" if pairs else f", {prompt_column!r} or text")
    raise ConfigError(f"{key}=auto: the first records have none of the fields {kinds}; set {key}")


def _with_slot(rec: dict[str, Any], fmt: str) -> dict[str, Any]:
    """``rec`` with a placeholder answer where it has none, so the row checks pass on a prompt-only row."""
    if fmt == "alpaca" and rec.get("output") is None:
        return {**rec, "output": _PLACEHOLDER}
    key, role_key, text_key, role = _TURNS.get(fmt, (None,) * 4)
    turns = rec.get(key) if key else None
    last = turns[-1] if isinstance(turns, list) and turns else None
    if isinstance(last, dict) and last.get(role_key) not in ("assistant", "gpt", "function_call"):
        return {**rec, key: [*turns, {role_key: role, text_key: _PLACEHOLDER}]}
    return rec


def to_prompt(raw: str, fmt: str, prompt_column: str, system_prompt: str | None = None) -> PromptRow:
    """One record (a JSON string) of format ``fmt`` as a :class:`PromptRow`.

    Raises:
        RowError: the record does not fit (the preprocessor's reasons, or ``read_error`` reasons).
    """
    rec = parse_record(raw)
    if "__read_error__" in rec:
        raise RowError(str(rec["__read_error__"]), str(rec.get("__detail__", "")))
    if fmt == "prompt":
        text = rec.get(prompt_column)
        if not isinstance(text, str) or not text.strip():
            raise RowError("missing_field", f"field {prompt_column!r} is missing, empty or not text")
        turns = [{"role": "user", "content": text}]
        if system_prompt:
            turns.insert(0, {"role": "system", "content": system_prompt})
        reference = rec.get("reference")
        return PromptRow(turns, text, turns, reference if isinstance(reference, str) else None)
    if fmt == "text":
        text = rec.get("text")
        if not isinstance(text, str) or not text.strip():
            raise RowError("missing_field", "field 'text' is missing, empty or not text")
        return PromptRow(text, text, None, None)
    ex = to_example(_with_slot(rec, fmt), fmt, system_prompt)
    turns, answer = [dict(t) for t in ex.turns[:-1]], ex.turns[-1].get("content")
    user = next((t.get("content", "") for t in reversed(turns) if t["role"] == "user"), "")
    reference = None if answer == _PLACEHOLDER or not isinstance(answer, str) else answer
    prompt: Prompt = ToolPrompt(turns, ex.tools) if ex.tools else turns
    return PromptRow(prompt, str(user), turns, reference)

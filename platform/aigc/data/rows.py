"""The row work: validate, render the chat template, tokenize a whole batch at once, apply the length policy.

:class:`Tokenize` is the Ray Data actor (the tokenizer is loaded once per actor). Each row of a batch comes out
either kept (``input_ids``, ``labels`` with -100 on prompt tokens, its split) or quarantined with a reason:
any exception while handling one row is that row's failure, never the batch's.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa

from aigc.config import DataConfig, ModelConfig
from aigc.data.formats import RowError, to_example
from aigc.data.reading import rename

__all__ = ["OUT_SCHEMA", "Tokenize", "fit_length", "split_of"]

OUT_SCHEMA = pa.schema(
    [
        ("ok", pa.bool_()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.string()),  # kept only for quarantined rows
        ("split", pa.string()),  # train | val | quarantine
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
        ("n_target_tokens", pa.int32()),
        ("truncated", pa.bool_()),
    ]
)


def split_of(prompt_key: str, seed: int, val_fraction: float) -> str:
    """train or val by a hash of the prompt: stable across runs, duplicated prompts never straddle the split."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}\x00{prompt_key}".encode(), digest_size=8).digest(), "big")
    return "val" if h / 2**64 < val_fraction else "train"


def fit_length(prompt: list[int], target: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut ``prompt + target`` to exactly ``max_length`` tokens when longer (the truncate policy).

    The prompt loses tokens from the left (oldest context first) down to half of ``max_length``; if the
    example is still too long the target is cut from the right. The target keeps at least one token, so a
    prompt longer than ``max_length`` on its own keeps its last ``max_length - 1`` tokens.
    """
    if len(prompt) + len(target) <= max_length:
        return prompt, target
    n_target = min(len(target), max_length - min(len(prompt), max_length // 2))
    return prompt[len(prompt) - (max_length - n_target) :], target[:n_target]


class Tokenize:
    """Ray Data actor: validates, renders the chat template and tokenizes a batch of raw records."""

    def __init__(self, model: dict[str, Any], data: dict[str, Any]):
        from aigc.data.templates import end_of_turn, render_prompt
        from aigc.models.loading import load_tokenizer

        self.model_cfg, self.cfg = ModelConfig(**model), DataConfig(**data)
        self.tok = load_tokenizer(self.model_cfg.name_or_path, self.model_cfg.trust_remote_code)
        self._render, self._eot = render_prompt, end_of_turn(self.tok)

    def _texts(self, raw: str) -> tuple[str, str]:
        """(prompt, target) text of one record; raises RowError."""
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RowError("invalid_json", f"not valid JSON: {exc.msg}") from None
        if not isinstance(rec, dict):
            raise RowError("wrong_type", f"a record must be an object, got {type(rec).__name__}")
        ex = to_example(rename(rec, self.cfg.columns), self.cfg.format, self.cfg.system_prompt)
        if ex.raw_text:
            return "", ex.response + self._eot
        try:
            prompt = self._render(self.tok, ex.messages)
        except Exception as exc:  # a template may reject a conversation (e.g. roles not alternating)
            raise RowError("template_error", f"the chat template failed: {type(exc).__name__}: {exc}") from None
        return prompt, ex.response + self._eot

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """One fast-tokenizer call for the whole batch."""
        return self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        raws = [str(r) for r in batch["raw"]]
        cols: dict[str, list] = {name: [] for name in OUT_SCHEMA.names}
        texts: dict[int, tuple[str, str]] = {}
        failed: dict[int, tuple[str, str]] = {}
        for i, raw in enumerate(raws):
            try:
                texts[i] = self._texts(raw)
            except RowError as err:
                failed[i] = (err.reason, err.detail)
            except Exception as exc:  # a bug or an odd value in one row quarantines that row only
                failed[i] = ("row_error", f"{type(exc).__name__}: {exc}")
        order = list(texts)
        try:
            ids = self._encode([texts[i][0] for i in order] + [texts[i][1] for i in order])
            encoded = {i: (ids[k], ids[len(order) + k]) for k, i in enumerate(order)}
        except Exception:  # find the row the tokenizer rejects; the others are encoded one by one
            encoded = {}
            for i in order:
                try:
                    encoded[i] = tuple(self._encode(list(texts[i])))
                except Exception as exc:
                    failed[i] = ("tokenize_error", f"{type(exc).__name__}: {exc}")
        limit = self.cfg.max_length
        for i, raw in enumerate(raws):
            if i in encoded:
                p_ids, t_ids = encoded[i]
                n = len(p_ids) + len(t_ids)
                if n > limit and self.cfg.overflow == "drop":
                    failed[i] = ("too_long", f"{n} tokens > data.max_length={limit}")
                else:
                    p_ids, t_ids = fit_length(p_ids, t_ids, limit)
                    prompt, target = texts[i]
                    split = split_of(prompt or target, self.cfg.seed, self.cfg.val_fraction)
                    ids, labels = p_ids + t_ids, [-100] * len(p_ids) + t_ids
                    row = (True, "", "", "", split, ids, labels, len(ids), len(t_ids), n > limit)
            if i in failed:
                row = (False, *failed[i], raw, "quarantine", [], [], 0, 0, False)
            for name, value in zip(OUT_SCHEMA.names, row, strict=True):
                cols[name].append(value)
        return pa.Table.from_pydict(cols, schema=OUT_SCHEMA)

"""The row work: validate, render the chat template, tokenize a whole batch at once, apply the length policy.

:class:`Tokenize` is the Ray Data actor (the tokenizer is loaded once per actor). Input columns: ``raw`` (each
record as a JSON string), and optionally ``source`` (index into ``data.sources()``: the row's format and
column renames; absent = 0) and ``read_error``/``read_detail`` (a row the reader could not read: quarantined
with that reason). Each row comes out as one :data:`OUT_SCHEMA` row, either kept (``input_ids``; ``labels``
equal to the ids on every assistant turn and -100 elsewhere, see :mod:`aigc.data.templates`; its split; the
``key`` of its normalized conversation for exact dedup) or quarantined with a reason. Any exception while
handling one row is that row's failure, never the batch's.

1. each row is validated (:mod:`aigc.data.formats`) and rendered with its trained character spans;
2. the texts of all rows go through ONE fast-tokenizer call, with character offsets; a token is trained when
   it overlaps a trained span;
3. the length policy (``data.overflow``): ``drop`` quarantines a row longer than ``data.max_length`` as
   ``too_long``; ``truncate`` first drops the oldest whole exchanges of the history (keeping the system turn,
   the tools and the last exchange), then cuts with :func:`fit_length` (prompt from the left, then the last
   answer from the right).

A row whose text contains one of the chat template's control tokens (``<|end|>``...) is quarantined as
``control_token``: serving reads such text as characters (:func:`aigc.data.templates.encode_chat`), so a
model trained on it as a token would learn something serving never shows it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from typing import Any

import numpy as np
import pyarrow as pa

from aigc.config import DataConfig, ModelConfig
from aigc.data.formats import Example, RowError, conversation_key, parse_record, to_example
from aigc.data.reading import rename
from aigc.data.templates import Rendered

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
        ("last_turn_only", pa.bool_()),  # the template is not prefix-stable: only the last answer is trained
        ("source", pa.int32()),  # index into data.sources()
        ("key", pa.int64()),  # hash of the normalized conversation (0 when quarantined)
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


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """The id of every token that overlaps a trained span, -100 elsewhere (spans and tokens are in order)."""
    labels, k = [-100] * len(ids), 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            labels[i] = ids[i]
    return labels


def _text(value: Any) -> str:
    """A string column's value; None and NaN (pandas' missing value) are empty."""
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def _token_at(starts: list[int], offsets: list[tuple[int, int]], char: int) -> int | None:
    """Index of the first token starting at or after ``char``; None when a token straddles ``char``."""
    i = bisect.bisect_left(starts, char)
    return i if i == 0 or offsets[i - 1][1] <= char else None


class Tokenize:
    """Ray Data actor: validates, renders the chat template and tokenizes a batch of raw records."""

    schema = OUT_SCHEMA  # the output columns (a preference row has two more: aigc.data.pair_tokenizing)

    def __init__(self, model: ModelConfig, data: DataConfig):
        from aigc.data.templates import control_tokens, end_of_turn
        from aigc.models.loading import load_tokenizer

        self.model_cfg, self.cfg = model, data
        self.sources = self.cfg.sources()
        # the snapshot the driver resolved (aigc.models.hub), never the hub id
        self.tok = load_tokenizer(self.model_cfg.load_path(), self.model_cfg.trust_remote_code)
        self._eot = end_of_turn(self.tok)
        controls = sorted(control_tokens(self.tok), key=len, reverse=True)
        self._controls = re.compile("|".join(map(re.escape, controls))) if controls else None

    # 1. one row ---------------------------------------------------------------------------------------------
    def _record(self, raw: str, source: int) -> tuple[dict[str, Any], str]:
        """The record with its source's column renames, and its format."""
        rec = parse_record(raw)
        if not 0 <= source < len(self.sources):
            raise RowError("bad_source", f"source {source} is not one of the {len(self.sources)} datasets")
        src = self.sources[source]
        return rename(rec, src.columns or {}), src.format

    def _example(self, raw: str, source: int) -> Example:
        return to_example(*self._record(raw, source), self.cfg.system_prompt)

    def _prepare(self, raw: str, source: int) -> Any:
        """A row validated and rendered (the item :meth:`_texts` and :meth:`_row` take); RowError if it is bad."""
        ex = self._example(raw, source)
        self._check_controls(ex)
        return ex, self._render(ex)

    def _texts(self, item: Any) -> list[str]:
        """The texts of a prepared row that go through the batch's tokenizer call."""
        return [item[1].text]

    def _row(self, item: Any, encoded: list[tuple[list[int], list]], source: int) -> tuple:
        """The output row of a prepared row from its texts' (ids, offsets)."""
        return self._kept(*item, *encoded[0], source)

    def _failed(self, reason: str, detail: str, raw: str, source: int) -> tuple:
        return (False, reason, detail, raw, "quarantine", [], [], 0, 0, False, False, source, 0)

    def _check_controls(self, ex: Example) -> None:
        if self._controls is None:
            return
        strings = [ex.text] if ex.raw_text else [json.dumps([ex.turns, ex.tools], ensure_ascii=False)]
        for s in strings:
            found = self._controls.search(s)
            if found:
                raise RowError("control_token", f"the text contains {found.group()!r}, a control token of this "
                               "tokenizer's chat template; serving would read it as plain text")  # fmt: skip

    def _render(self, ex: Example) -> Rendered:
        from aigc.data.templates import render_for_training

        if ex.raw_text:
            text = ex.text + self._eot
            return Rendered(text=text, spans=[(0, len(text))], prompt="")
        try:
            return render_for_training(self.tok, ex.turns, ex.tools)
        except Exception as exc:  # a template may reject a conversation (e.g. roles not alternating)
            raise RowError("template_error", f"the chat template failed: {type(exc).__name__}: {exc}") from None

    # 2. the batch's one tokenizer call ----------------------------------------------------------------------
    def _encode(self, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        if not texts:
            return [], []
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    # 3. the length policy -----------------------------------------------------------------------------------
    def _drop_history(self, ex: Example, r: Rendered, offsets: list, n: int) -> tuple[int, int] | None:
        """Token ranges ``[0, a)`` + ``[b, n)`` that keep the system turn (and tools) and the newest exchanges
        that fit, dropping the oldest whole exchanges; None when the template does not allow it."""
        from aigc.data.templates import render_chat

        if not r.cuts:
            return None
        head = next((i for i, t in enumerate(ex.turns) if t["role"] != "system"), 0)

        def kept_head(j: int) -> int | None:
            """Characters of ``full`` before exchange 0 that rendering without exchanges < j keeps."""
            try:
                text = render_chat(self.tok, ex.turns[:head] + ex.turns[r.cut_turns[j] :], ex.tools)
            except Exception:
                return None
            c0 = len(text) - (len(r.full) - r.cuts[j])
            ok = 0 <= c0 <= r.cuts[0] and text == r.full[:c0] + r.full[r.cuts[j] :]
            return c0 if ok else None

        starts = [s for s, _ in offsets]
        c0 = kept_head(len(r.cuts) - 1)
        a = None if c0 is None else _token_at(starts, offsets, c0)
        if a is None:
            return None
        ends = [_token_at(starts, offsets, c) for c in r.cuts]
        fits = [j for j, b in enumerate(ends) if b is not None and a + n - b <= self.cfg.max_length]
        j = fits[0] if fits else len(ends) - 1  # the fewest exchanges dropped, or all but the last
        if ends[j] is None or (j < len(ends) - 1 and kept_head(j) != c0):
            return None
        return a, ends[j]

    def _fit(self, ex: Example, r: Rendered, ids: list[int], labels: list[int], offsets: list) -> tuple:
        """(ids, labels) of at most ``data.max_length`` tokens (the truncate policy)."""
        limit = self.cfg.max_length
        last = bisect.bisect_right([e for _, e in offsets], r.spans[-1][0])  # first token of the last answer
        kept = self._drop_history(ex, r, offsets, len(ids)) if r.cuts else None
        if kept is not None:
            a, b = kept
            ids, labels, last = ids[:a] + ids[b:], labels[:a] + labels[b:], last - (b - a)
        p, t = fit_length(ids[:last], ids[last:], limit)
        return ids[last - len(p) : last + len(t)], labels[last - len(p) : last + len(t)]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        raws = [str(r) for r in batch["raw"]]
        n_rows = len(raws)
        sources = [int(s) for s in batch["source"]] if "source" in batch else [0] * n_rows
        errors = [_text(e) for e in batch.get("read_error", [""] * n_rows)]
        details = [_text(d) for d in batch.get("read_detail", [""] * n_rows)]
        rows: dict[int, Any] = {}
        failed: dict[int, tuple[str, str]] = {}
        for i, raw in enumerate(raws):
            if errors[i]:
                failed[i] = (errors[i], details[i])
                continue
            try:
                rows[i] = self._prepare(raw, sources[i])
            except RowError as err:
                failed[i] = (err.reason, err.detail)
            except Exception as exc:  # a bug or an odd value in one row quarantines that row only
                failed[i] = ("row_error", f"{type(exc).__name__}: {exc}")

        texts = {i: self._texts(item) for i, item in rows.items()}
        try:
            ids, offs = self._encode([t for i in rows for t in texts[i]])
            pairs, encoded = iter(list(zip(ids, offs, strict=True))), {}
            for i in rows:  # each row's texts, in order
                encoded[i] = [next(pairs) for _ in texts[i]]
        except Exception:  # find the row the tokenizer rejects; the others are encoded one by one
            encoded = {}
            for i in rows:
                try:
                    encoded[i] = list(zip(*self._encode(texts[i]), strict=True))
                except Exception as exc:
                    failed[i] = ("tokenize_error", f"{type(exc).__name__}: {exc}")

        cols: dict[str, list] = {name: [] for name in self.schema.names}
        for i, raw in enumerate(raws):
            if i in encoded:
                try:
                    row = self._row(rows[i], encoded[i], sources[i])
                except RowError as err:
                    failed[i] = (err.reason, err.detail)
                except Exception as exc:
                    failed[i] = ("row_error", f"{type(exc).__name__}: {exc}")
            if i in failed:
                row = self._failed(*failed[i], raw, sources[i])
            for name, value in zip(self.schema.names, row, strict=True):
                cols[name].append(value)
        return pa.Table.from_pydict(cols, schema=self.schema)

    def _kept(self, ex: Example, r: Rendered, ids: list[int], offsets: list, source: int) -> tuple:
        """The OUT_SCHEMA row of a rendered, encoded example; RowError ``too_long`` under overflow=drop."""
        labels, n, limit = _labels(ids, offsets, r.spans), len(ids), self.cfg.max_length
        over = n > limit and not (ex.raw_text and self.cfg.packing)  # packed documents are cut into blocks
        if over:
            if self.cfg.overflow == "drop":
                raise RowError("too_long", f"{n} tokens > data.max_length={limit}")
            ids, labels = self._fit(ex, r, ids, labels, offsets)
        n_target = sum(1 for x in labels if x != -100)
        split = split_of(r.prompt or r.text, self.cfg.seed, self.cfg.val_fraction)
        key = conversation_key(ex)
        return (True, "", "", "", split, ids, labels, len(ids), n_target, over, r.last_turn_only, source, key)

"""The row work for preference pairs (``data.preference``): :class:`TokenizePairs`, the Ray Data actor.

The same steps as :class:`aigc.data.tokenizing.Tokenize`, for both conversations of a pair
(:mod:`aigc.data.pairs`): the same validation, control-token check and chat template (both renderings, prompt and
answer, in the batch's one tokenizer call), the same quarantine reasons, split (a hash of the prompt) and dedup key
(prompt and both answers). A kept row is the chosen conversation in ``input_ids``/``labels`` and the rejected one
in ``rejected_ids``/``rejected_labels``, both starting with the same prompt tokens; only the final answer's tokens
carry labels (earlier assistant turns are prompt here: a preference is about the last answer).

The length policy (``data.overflow``) treats the pair as one example whose answer is the longer of the two:
``drop`` quarantines it as ``too_long`` when either conversation is over ``data.max_length``; ``truncate`` drops
the oldest whole exchanges of the shared history, then cuts the shared prompt from the left and both answers from
the right to the same number of tokens (:func:`aigc.data.tokenizing.fit_length`): the two answers stay comparable.
"""

from __future__ import annotations

import bisect

import pyarrow as pa

from aigc.data.formats import RowError
from aigc.data.pairs import Pair, pair_key, to_pair
from aigc.data.templates import Rendered
from aigc.data.tokenizing import OUT_SCHEMA, Tokenize, _labels, fit_length, split_of

__all__ = ["PAIR_COLUMNS", "PAIR_SCHEMA", "TokenizePairs"]

PAIR_COLUMNS = ["rejected_ids", "rejected_labels"]
PAIR_SCHEMA = OUT_SCHEMA.append(pa.field("rejected_ids", pa.list_(pa.int32()))).append(
    pa.field("rejected_labels", pa.list_(pa.int32()))
)

Encoded = tuple[list[int], list[tuple[int, int]]]


class TokenizePairs(Tokenize):
    """Ray Data actor: validates, renders and tokenizes a batch of raw preference records (see module doc).

    Output: :data:`PAIR_SCHEMA` rows; ``n_tokens`` is the longer conversation's length and ``n_target_tokens``
    the answer tokens of both.
    """

    schema = PAIR_SCHEMA

    def _prepare(self, raw: str, source: int) -> tuple[Pair, Rendered, Rendered]:
        rec, fmt = self._record(raw, source)
        pair = to_pair(rec, fmt, self.cfg.system_prompt)
        self._check_controls(pair.chosen)
        self._check_controls(pair.rejected)
        chosen, rejected = self._render(pair.chosen), self._render(pair.rejected)
        if chosen.prompt != rejected.prompt:
            raise RowError("template_error", "the chat template renders the prompt differently before the two answers")
        return pair, chosen, rejected

    def _texts(self, item: tuple[Pair, Rendered, Rendered]) -> list[str]:
        return [item[1].text, item[2].text]

    def _failed(self, reason: str, detail: str, raw: str, source: int) -> tuple:
        return (*super()._failed(reason, detail, raw, source), [], [])

    def _row(self, item: tuple[Pair, Rendered, Rendered], encoded: list[Encoded], source: int) -> tuple:
        pair, *rendered = item
        sides = []  # (ids, labels, index of the answer's first token) of chosen, then rejected
        for r, (ids, offsets) in zip(rendered, encoded, strict=True):
            last = bisect.bisect_right([e for _, e in offsets], r.spans[-1][0])
            sides.append((list(ids), _labels(ids, offsets, r.spans[-1:]), last))
        (c_ids, _, c_last), (r_ids, _, r_last) = sides
        if c_ids[:c_last] != r_ids[:r_last]:
            raise RowError("tokenize_error", "the prompt tokenizes differently before the two answers")
        n, limit = max(len(c_ids), len(r_ids)), self.cfg.max_length
        over = n > limit
        if over:
            if self.cfg.overflow == "drop":
                raise RowError("too_long", f"{n} tokens > data.max_length={limit}")
            sides = self._fit_pair(pair, rendered, encoded, sides)
        (c_ids, c_labels, _), (r_ids, r_labels, _) = sides
        n_target = sum(1 for x in [*c_labels, *r_labels] if x != -100)
        split = split_of(rendered[0].prompt, self.cfg.seed, self.cfg.val_fraction)
        last_only = rendered[0].last_turn_only or rendered[1].last_turn_only
        return (True, "", "", "", split, c_ids, c_labels, max(len(c_ids), len(r_ids)), n_target, over, last_only,
                source, pair_key(pair), r_ids, r_labels)  # fmt: skip

    def _fit_pair(self, pair: Pair, rendered: list[Rendered], encoded: list[Encoded], sides: list) -> list:
        """Both sides cut alike to at most ``data.max_length`` tokens (the truncate policy, module doc)."""
        longer = 0 if len(sides[0][0]) >= len(sides[1][0]) else 1
        ex, r = (pair.chosen, pair.rejected)[longer], rendered[longer]
        ids, offsets = encoded[longer]
        kept = self._drop_history(ex, r, offsets, len(ids)) if r.cuts else None  # a range of the shared prompt
        out = []
        for ids, labels, last in sides:
            if kept is not None:
                a, b = kept
                ids, labels, last = ids[:a] + ids[b:], labels[:a] + labels[b:], last - (b - a)
            out.append((ids, labels, last))
        longest = max(len(ids) - last for ids, _, last in out)
        p, t = fit_length(out[0][0][: out[0][2]], [0] * longest, self.cfg.max_length)
        return [(ids[last - len(p) : last + len(t)], labels[last - len(p) : last + len(t)], len(p))
                for ids, labels, last in out]  # fmt: skip

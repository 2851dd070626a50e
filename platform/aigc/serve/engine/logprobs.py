"""Log-probabilities of generated tokens, from the logits of the step that sampled them.

Which distribution: the model's raw one, ``log_softmax(logits)`` of the step, before temperature, top-k and top-p
(vLLM's default, ``raw_logprobs``): a token's figure does not depend on the sampling settings that chose it.

What it costs: only the rows that asked pay. :func:`step_logprobs` selects those rows' logits, runs one
``log_softmax`` over them and one ``topk`` with the largest k asked; a batch where no row asked does no work at all.

Which tokens are reported (:class:`LogprobTracker`): each token's figure waits until the text it decodes to has
been sent, then leaves with that text, so a streamed chunk carries the figures of the tokens in its text. Tokens
whose text starts at or after a stop string's cut are never reported; nor is the eos token (it has no text).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch

from aigc.serve.engine.types import TokenLogprob, TopLogprob

__all__ = ["FLOOR", "LogprobTracker", "StepLogprob", "step_logprobs", "token_bytes", "token_texts"]

FLOOR = -9999.0  # what a ruled-out token (-inf) or an undefined figure is reported as (OpenAI's convention)

# (chosen token's log-probability, [(alternative id, its log-probability), ...] most likely first)
StepLogprob = tuple[float, list[tuple[int, float]]]


def step_logprobs(logits: torch.Tensor, wants: list[int | None], tokens: list[Any]) -> list[StepLogprob | None]:
    """Per row, the chosen token's log-probability and the top-k alternatives, for the rows that asked.

    Args:
        logits: ``[rows, vocab]`` scores of the step.
        wants: per row, None (no log-probabilities) or k (alternatives wanted, 0..20).
        tokens: per row, the token sampled (an int) or the error that ended the row (skipped).
    """
    out: list[StepLogprob | None] = [None] * len(wants)
    rows = [i for i, (k, t) in enumerate(zip(wants, tokens, strict=True)) if k is not None and isinstance(t, int)]
    if not rows:
        return out  # nobody asked: no work
    index = torch.tensor(rows, device=logits.device)
    lp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    lp = torch.nan_to_num(lp, nan=FLOOR, neginf=FLOOR)  # a row whose every score is -inf has no distribution
    chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=lp.device)).squeeze(1).tolist()
    k = min(max(wants[i] for i in rows), lp.shape[-1])
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(rows):
        kk = wants[i]
        out[i] = (chosen[j], list(zip(top_i[j][:kk], top_v[j][:kk], strict=True)))
    return out


def token_texts(tokenizer: Any) -> Callable[[int], tuple[str, bytes]]:
    """A token id's text decoded alone (special tokens included) and its own bytes, cached: reused for every
    alternative."""

    @lru_cache(maxsize=65536)
    def text(token_id: int) -> tuple[str, bytes]:
        decoded = tokenizer.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in decoded:
            return decoded, decoded.encode("utf-8")
        return decoded, token_bytes(tokenizer.convert_ids_to_tokens(token_id), decoded)

    return text


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte tokens


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte (byte-level BPE vocabularies)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_table()


def token_bytes(piece: str, decoded: str) -> bytes:
    """The bytes of a token that decodes alone to a broken character: from its vocabulary entry (a byte-level BPE
    piece, or a sentencepiece ``<0xNN>`` byte); the decoded text's UTF-8 when the entry is neither."""
    fallback = _BYTE_FALLBACK.fullmatch(piece)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    if piece and all(c in _BYTE_LEVEL for c in piece):
        return bytes(_BYTE_LEVEL[c] for c in piece)
    return decoded.encode("utf-8")


class LogprobTracker:
    """One choice's reported tokens: each waits until its text is sent, and none after the text ends.

    Args:
        text_of: a token id's text (:func:`token_texts`).
    """

    def __init__(self, text_of: Callable[[int], tuple[str, bytes]]):
        self._text_of = text_of
        self.decoded = 0  # characters the detokenizer produced so far
        self.sent = 0  # characters sent to the caller so far
        self._pending: list[TokenLogprob] = []  # placed in the text, waiting for it to be sent
        self._unplaced: list[tuple[int, StepLogprob]] = []  # decoded to no text yet

    def add(self, token_id: int, figures: StepLogprob, piece: str) -> None:
        """Record a token; ``piece`` is the text the detokenizer released with it (often empty: the detokenizer
        holds tokens back until a word or a character is complete, then releases their text at once).

        Tokens released together are placed in the piece by the lengths of their own texts (exact when tokens
        decode alone to their part of the text, as byte-level BPE tokens do), never past its end.
        """
        self._unplaced.append((token_id, figures))
        if not piece:
            return
        run = 0
        for tid, (logprob, top) in self._unplaced:
            text, raw = self._text_of(tid)
            alternatives = tuple(TopLogprob(t, *self._alternative(t, v)) for t, v in top)
            offset = self.decoded + min(run, len(piece) - 1)
            self._pending.append(TokenLogprob(tid, text, _finite(logprob), offset, alternatives, raw))
            run += len(text)
        self._unplaced.clear()
        self.decoded += len(piece)

    def _alternative(self, token_id: int, logprob: float) -> tuple[str, float, bytes]:
        text, raw = self._text_of(token_id)
        return text, _finite(logprob), raw

    def release(self, sent_text: str) -> list[TokenLogprob]:
        """The tokens whose text starts within the text sent so far (``sent_text``: the newly sent part)."""
        self.sent += len(sent_text)
        ready = [t for t in self._pending if t.offset < self.sent]
        self._pending = self._pending[len(ready) :]  # offsets only grow: the ready ones are a prefix
        return ready


def _finite(v: float) -> float:
    return v if math.isfinite(v) and v > FLOOR else FLOOR

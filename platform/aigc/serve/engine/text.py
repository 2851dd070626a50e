"""Per-request text handling on the engine thread: incremental detokenization and stop strings.

Both are O(new text) per step: the detokenizer decodes only a short window of recent tokens (the
prefix/read-offset method of vLLM and TGI), and the stop filter scans only the held-back tail plus the new
piece, never the whole reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer", "StopFilter"]


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces, never splitting a multi-byte character.

    ``push(ids)`` returns the text the newest tokens completed; bytes of an unfinished character (decoded as
    U+FFFD) stay pending until the next token completes them.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context (merges across token boundaries)
        self._read = 0  # tokens whose text was already returned

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""


class StopFilter:
    """Streams text with stop strings cut out: holds back only a tail that could still become a stop string.

    The buffer never holds more than ``max(len(stop)) - 1`` characters plus the newest piece, so each push
    costs O(piece) for a fixed set of stops.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.buffer = ""
        self.hit = False

    def push(self, piece: str) -> str:
        """Text safe to emit now; after a stop string completes, ``hit`` is set and nothing more is emitted."""
        if self.hit:
            return ""
        self.buffer += piece
        if not self.stops:
            out, self.buffer = self.buffer, ""
            return out
        cut = _first_stop(self.buffer, self.stops)
        if cut is not None:
            out, self.buffer, self.hit = self.buffer[:cut], "", True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buffer)), hold, -1):
                if self.buffer.endswith(s[:k]):
                    hold = k
                    break
        out, self.buffer = self.buffer[: len(self.buffer) - hold], self.buffer[len(self.buffer) - hold :]
        return out

    def flush(self) -> str:
        """The held-back tail, at the end of a reply that hit no stop string."""
        out, self.buffer = ("" if self.hit else self.buffer), ""
        return out


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where to cut ``text``: the start of the stop string that *completes* first, or None."""
    best: tuple[int, int] | None = None  # (end, start)
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    return None if best is None else best[1]

"""Where each assistant turn sits in a rendering, from ONE template rendering, for templates known to allow it.

:func:`aigc.data.templates.render_for_training` defines the trained spans through prefix renderings: for
assistant turn ``a``, ``before = render(turns[:a], add_generation_prompt=True)`` and
``through = render(turns[:a+1])``; that is two ``apply_chat_template`` calls per assistant turn, about half of
the row time. For the templates in :data:`_KNOWN` those prefix renderings are provably prefixes of the full
rendering, at offsets that one rendering reveals:

1. each such template is a loop over the messages writing one piece per message, ``header(role) + content +
   ...``, where the content is written verbatim, written once, and never tested (no filter, no condition on
   it); nothing before a piece depends on later messages (no ``loop.last``, no ``messages | length``) and
   ``add_generation_prompt`` only appends ``header('assistant')`` after the loop (the system message may move
   into a tools header, still verbatim and once);
2. so rendering the conversation with a unique sentinel ``\\x00k\\x00`` in front of each message's content,
   then deleting the sentinels, gives exactly the full rendering, and sentinel ``k`` sits where message ``k``'s
   content starts; message ``k``'s piece starts ``len(header(role_k))`` characters earlier;
3. hence ``len(before_a)`` is where assistant ``a``'s content starts (its piece start plus the generation
   prompt, which is its header) and ``len(through_a)`` is where the next piece starts (the end for the last).

Any other template, and any row where the proof's premises are not checked true here (a content that is not
a string or already contains ``\\x00``, a sentinel not written exactly once, a role the template does not
write, a template error) returns None: the caller renders the prefixes as before. A changed template string
is a different template: only byte-identical template text is known.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from aigc.models.chat_template import DEFAULT_CHAT_TEMPLATE

__all__ = ["Offsets", "single_render_offsets"]

# (full rendering, [(len(before_a), len(through_a)) for each assistant turn a])
Offsets = tuple[str, list[tuple[int, int]]]

_DEFAULT_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n",
                    "tool": "<|user|>\n<tool_result>\n"}  # fmt: skip

# ChatML exactly as Qwen-style minimal templates write it (the one tests/test_templates.py uses)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# template text -> the header a message of that role gets before its content (None: the role is not written)
_KNOWN: dict[str, Callable[[str], str | None]] = {
    DEFAULT_CHAT_TEMPLATE: _DEFAULT_HEADERS.get,
    CHATML_TEMPLATE: lambda role: f"<|im_start|>{role}\n",
}
_SENTINEL = re.compile("\x00([0-9]+)\x00")


def single_render_offsets(
    template: Any, turns: list[dict[str, Any]], render: Callable[[list[dict[str, Any]]], str]
) -> Offsets | None:
    """The full rendering of ``turns`` and each assistant turn's ``(len(before), len(through))`` from one call
    of ``render`` (the tokenizer's template on a list of messages, no generation prompt); None when
    ``template`` is not known or this row does not meet the premises (see module doc)."""
    header = _KNOWN.get(template) if isinstance(template, str) else None
    if header is None or not turns:
        return None
    heads = [header(t.get("role", "")) for t in turns]
    if any(h is None or "\x00" in h for h in heads):
        return None
    if any(not isinstance(t.get("content"), str) or "\x00" in t["content"] for t in turns):
        return None
    marked = [{**t, "content": f"\x00{k}\x00{t['content']}"} for k, t in enumerate(turns)]
    try:
        text = render(marked)
    except Exception:  # the caller's renderings raise the same error, with the row's real text
        return None
    pieces, starts, found = _SENTINEL.split(text), [0] * len(turns), [0] * len(turns)
    full = pieces[0]
    for i in range(1, len(pieces), 2):
        k = int(pieces[i])
        if k >= len(turns):
            return None
        starts[k], found[k] = len(full), found[k] + 1
        full += pieces[i + 1]
    if any(n != 1 for n in found):
        return None
    piece_start = [s - len(h) for s, h in zip(starts, heads, strict=True)] + [len(full)]
    if any(full[p:s] != h for p, s, h in zip(piece_start, starts, heads, strict=False)):
        return None
    spans = [(starts[a], piece_start[a + 1]) for a, t in enumerate(turns) if t["role"] == "assistant"]
    return full, spans

"""The chat template, shared by preprocessing and serving, and where each assistant turn sits in its rendering.

A conversation is always rendered by the tokenizer's own chat template (``apply_chat_template``, with
``tools=`` when the row has tools), so what the model is trained on is exactly what it is served with.
Tokenizers without a template (base models) get :data:`aigc.models.chat_template.DEFAULT_CHAT_TEMPLATE`,
which the project's tiny model also ships.

Which characters are trained (:func:`render_for_training`). The text of assistant turn ``k`` is
``render(turns[:k+1])`` minus ``render(turns[:k], add_generation_prompt=True)``, cut right after the
tokenizer's eos token (the token serving stops on); what the template writes after it (a newline) belongs to
the next prompt. This needs a *prefix-stable* template: each of those renderings starts with the one before,
and every assistant turn it writes ends with eos. The project's template, ChatML-style ones (Qwen) and
Llama-3's are. A template that is not (one that rewrites earlier turns, say drops their reasoning, or closes
turns with something other than eos) trains the **last assistant turn only**: its prompt rendered exactly as
serving renders it, its target the rendered answer ending with eos (or the answer's text and eos, when the
template renders the prompt differently once the answer follows it); the row is counted as
``rows_last_turn_only`` in stats.json.

Those prefix renderings cost two template calls per assistant turn. For the project's default template and
ChatML, :mod:`aigc.data.turn_spans` proves their offsets from ONE rendering and :func:`render_for_training`
renders once; any other template, or a row outside that proof, takes :func:`render_by_prefixes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aigc.data.turn_spans import single_render_offsets

__all__ = [
    "Rendered",
    "control_tokens",
    "encode_chat",
    "end_of_turn",
    "render_chat",
    "render_by_prefixes",
    "render_for_training",
    "render_prompt",
]


def render_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The tokenizer's chat template applied to ``messages`` (and ``tools``), as text."""
    return tokenizer.apply_chat_template(
        list(messages), tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """Render the conversation so far, ending where the assistant's next turn starts."""
    return render_chat(tokenizer, messages, tools, add_generation_prompt=True)


def end_of_turn(tokenizer: Any) -> str:
    """Text that closes an assistant turn in training targets: the eos token the model learns to stop on."""
    return tokenizer.eos_token or ""


def control_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The tokens :func:`encode_chat` encodes as plain text inside messages: special added tokens, and the
    non-special added tokens the chat template writes (transformers' rule for ``sanitize_control_tokens``)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    template = template if isinstance(template, str) else " ".join(template.values())
    return tuple(
        t.content
        for t in tokenizer.added_tokens_decoder.values()
        if t.special or (t.content in template and not t.content.isspace())
    )


def encode_chat(
    tokenizer: Any, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """Token ids of :func:`render_prompt`, where text inside the messages never becomes a control token.

    A message containing ``<|assistant|>`` or ``<|end|>`` (any special token, or an added token the template
    writes) is encoded as those characters, so a user cannot forge turns; the markers the template itself
    writes stay control tokens. For messages without such text the ids equal tokenizing the rendered prompt.
    This is transformers' ``apply_chat_template(..., sanitize_control_tokens=True)``.

    Raises:
        ValueError: the tokenizer turns a control token's text back into that token even as plain text.
    """
    return list(
        tokenizer.apply_chat_template(
            list(messages),
            tools=tools or None,
            tokenize=True,
            add_generation_prompt=True,
            sanitize_control_tokens=True,
            return_dict=False,
        )
    )


@dataclass(frozen=True)
class Rendered:
    """A conversation rendered for training.

    ``text`` ends right after the last trained character; ``spans`` are the trained ``[start, end)`` character
    ranges (each assistant turn, ending with eos); ``prompt`` is the rendering serving would produce before
    the last assistant turn. ``cuts`` are the offsets in ``full`` (the rendering through the last turn) where
    an exchange starts: a user turn after an assistant turn (the length policy drops whole exchanges there),
    with ``cut_turns`` the index in the turn list of that user turn.
    """

    text: str
    spans: list[tuple[int, int]]
    prompt: str
    full: str = ""
    cuts: list[int] = field(default_factory=list)
    cut_turns: list[int] = field(default_factory=list)
    last_turn_only: bool = False


def _trained_part(delta: str, eos: str) -> str | None:
    """``delta`` up to and including its first eos, or None when the template did not write one."""
    at = delta.find(eos) if eos else -1
    return None if at < 0 else delta[: at + len(eos)]


def _cut_turns(turns: list[dict[str, Any]], last: int) -> list[int]:
    return [i for i in range(1, last + 1) if turns[i]["role"] == "user" and turns[i - 1]["role"] == "assistant"]


def render_for_training(
    tokenizer: Any, turns: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> Rendered:
    """Render ``turns`` (ending with an assistant turn) and find the characters to train on (see module doc).

    One rendering where :func:`aigc.data.turn_spans.single_render_offsets` proves it gives the prefix
    renderings' offsets (the project's default template, ChatML); otherwise :func:`render_by_prefixes`.

    Raises:
        Exception: whatever the template raises (a template may reject a conversation); ValueError when even
            the last turn cannot be told apart from its prompt.
    """
    eos = end_of_turn(tokenizer)
    found = single_render_offsets(
        getattr(tokenizer, "chat_template", None), turns, lambda msgs: render_chat(tokenizer, msgs, tools)
    ) if eos and turns and turns[-1]["role"] == "assistant" else None  # fmt: skip
    if found is None:
        return render_by_prefixes(tokenizer, turns, tools)
    full, offsets = found
    spans, ends = [], {}
    for a, (before, through) in zip([i for i, t in enumerate(turns) if t["role"] == "assistant"], offsets, strict=True):
        part = _trained_part(full[before:through], eos)
        if part is None:  # the two renderings fall to the last-turn-only path: let them decide it
            return render_by_prefixes(tokenizer, turns, tools)
        spans.append((before, before + len(part)))
        ends[a] = through
    cut_turns = _cut_turns(turns, len(turns) - 1)
    return Rendered(text=full[: spans[-1][1]], spans=spans, prompt=full[: spans[-1][0]], full=full,
                    cuts=[ends[i - 1] for i in cut_turns], cut_turns=cut_turns)  # fmt: skip


def render_by_prefixes(
    tokenizer: Any, turns: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> Rendered:
    """:func:`render_for_training` from the prefix renderings (two per assistant turn): any template."""
    eos = end_of_turn(tokenizer)
    assistants = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
    last = assistants[-1]
    prompt = render_chat(tokenizer, turns[:last], tools, add_generation_prompt=True)
    full = render_chat(tokenizer, turns[: last + 1], tools)

    # 1. every assistant turn, when the template is prefix-stable and closes each turn with eos
    spans, done, ends = [], 0, {}
    for a in assistants:
        try:  # a template may refuse a prefix (one starting with the assistant): then the last turn only
            before = prompt if a == last else render_chat(tokenizer, turns[:a], tools, add_generation_prompt=True)
            through = full if a == last else render_chat(tokenizer, turns[: a + 1], tools)
        except Exception:
            break
        part = _trained_part(through[len(before) :], eos) if through.startswith(before) else None
        if part is None or not before.startswith(full[:done]) or not full.startswith(through):
            break
        spans.append((len(before), len(before) + len(part)))
        done = ends[a] = len(through)
    else:
        cut_turns = _cut_turns(turns, last)
        return Rendered(
            text=full[: spans[-1][1]],
            spans=spans,
            prompt=prompt,
            full=full,
            cuts=[ends[i - 1] for i in cut_turns],
            cut_turns=cut_turns,
        )

    # 2. the last turn only: its prompt as serving renders it, its rendered answer closed by eos (or, when the
    #    template renders the conversation differently once the answer is in it, the answer's text and eos)
    if full.startswith(prompt) and full[len(prompt) :].strip():
        delta = full[len(prompt) :]
        target = _trained_part(delta, eos) or delta.rstrip() + eos
    elif turns[last]["content"].strip() and not turns[last].get("tool_calls"):
        target = turns[last]["content"] + eos
    else:
        raise ValueError("the chat template renders the conversation differently with a generation prompt")
    return Rendered(text=prompt + target, spans=[(len(prompt), len(prompt) + len(target))], prompt=prompt,
                    last_turn_only=True)  # fmt: skip

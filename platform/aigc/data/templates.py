"""The chat template, shared by preprocessing and serving.

A prompt is always rendered by the tokenizer's own chat template (``apply_chat_template``), so what the model
is trained on is exactly what it is served with. Tokenizers without a template (base models) get
:data:`DEFAULT_CHAT_TEMPLATE`, which the project's tiny model also ships.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "END_OF_TURN",
    "encode_chat",
    "end_of_turn",
    "ensure_chat_template",
    "render_prompt",
]

END_OF_TURN = "<|end|>"

# Role markers on their own line, the assistant turn closed by <|end|> (the tiny model's eos token).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}<|end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> Any:
    """Give a tokenizer without a chat template the default one (in place); returns the tokenizer."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """Render the conversation so far, ending where the assistant's next turn starts."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def end_of_turn(tokenizer: Any) -> str:
    """Text that closes an assistant turn in training targets: the eos token the model learns to stop on."""
    return tokenizer.eos_token or ""


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
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
            list(messages), tokenize=True, add_generation_prompt=True, sanitize_control_tokens=True, return_dict=False
        )
    )

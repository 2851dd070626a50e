"""Prompts to token ids, where what a client wrote never becomes a control token.

A chat goes through the tokenizer's chat template with transformers' ``sanitize_control_tokens``
(:func:`aigc.data.templates.encode_chat`): the turn markers the template writes are control tokens, the same
characters inside a message are text. A raw completion prompt is all client text: it is encoded with
``split_special_tokens``, on a copy of the tokenizer that always does so. (A tokenizer switches that mode on
its shared backend per call, so one instance used both ways from several threads could encode one request's
text in the other's mode.) ``split_special_tokens`` leaves *non-special* added tokens whole; a raw prompt
that still contains one the chat template writes (a turn marker a tokenizer did not mark special) is refused.
"""

from __future__ import annotations

import copy
from typing import Any

from jinja2 import TemplateError

from aigc.data.templates import encode_chat
from aigc.errors import InvalidRequestError
from aigc.serve.engine.tool_prompts import ToolPrompt

__all__ = ["PromptEncoder"]


class PromptEncoder:
    """Encodes the engine's prompts: ``str`` (a completion: the tokenizer's usual bos...) or a conversation.

    Safe to call from many threads at once.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._as_text = copy.deepcopy(tokenizer)
        self._as_text.split_special_tokens = True  # every call on this copy splits special tokens into text
        template = getattr(tokenizer, "chat_template", None) or ""
        template = template if isinstance(template, str) else " ".join(template.values())
        # Non-special added tokens that the template writes: turn markers split_special_tokens cannot split.
        self._markers = {
            i: t.content
            for i, t in tokenizer.added_tokens_decoder.items()
            if not t.special and t.content in template and not t.content.isspace()
        }

    def encode(self, prompt: str | list[dict[str, str]]) -> list[int]:
        """Token ids for ``prompt``.

        Raises:
            InvalidRequestError: the text contains something this tokenizer cannot encode as plain text (a
                lone surrogate, which JSON can carry as ``"\\ud800"`` but no tokenizer takes), or the chat
                template rejects the conversation (``raise_exception`` in a hub template).
        """
        _check_unicode(prompt)
        if isinstance(prompt, str):
            ids = list(self._as_text(prompt, add_special_tokens=True)["input_ids"])
            marker = next((self._markers[i] for i in ids if i in self._markers), None)
            if marker is not None:
                raise InvalidRequestError(
                    f"the prompt contains {marker!r}, a chat-template marker this model cannot read as plain text",
                    param="prompt",
                )
            return ids
        try:
            if isinstance(prompt, ToolPrompt):  # the tools rendered as training renders them; a forced opening
                return encode_chat(self.tokenizer, prompt, prompt.tools) + self._encode_opening(prompt.opening)
            return encode_chat(self.tokenizer, prompt)
        except TemplateError as exc:  # the model's own template refused the conversation (role order...)
            raise InvalidRequestError(
                f"this model's chat template rejected the messages: {str(exc)[:200]}",
                param="messages",
                code="invalid_messages",
            ) from None
        except ValueError as exc:  # transformers: "Can't sanitize ...: the tokenizer produces it from plain text"
            raise InvalidRequestError(
                "the messages contain a control token this model cannot read as plain text", param="messages"
            ) from exc

    def _encode_opening(self, opening: str) -> list[int]:
        """The forced start of the answer: server text (a call marker), so its control tokens stay tokens."""
        return list(self.tokenizer(opening, add_special_tokens=False)["input_ids"]) if opening else []


def _check_unicode(prompt: str | list[dict[str, str]]) -> None:
    """Refuse text that is not valid Unicode (lone surrogates): the tokenizer would fail with a TypeError."""
    if isinstance(prompt, str):
        texts = [("prompt", prompt)]
    else:
        texts = [(f"messages.{i}.{k}", v) for i, m in enumerate(prompt) for k, v in m.items() if isinstance(v, str)]
    for param, text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(
                f"{param} is not valid Unicode text: it holds a lone surrogate (\\u{ord(text[exc.start]):04x}) at "
                f"character {exc.start}",
                param=param,
            ) from None

"""The default chat template: what a tokenizer without one (a base model) is given when it is loaded.

It lives with model loading (:func:`aigc.models.loading.load_tokenizer` applies it), below the data layer;
rendering conversations with a tokenizer's template (training and serving) is ``aigc.data.templates``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_CHAT_TEMPLATE", "END_OF_TURN", "ensure_chat_template"]

END_OF_TURN = "<|end|>"

# Role markers on their own line, the assistant turn closed by the tokenizer's eos token (<|end|> for the tiny
# model, so a base model with another eos learns to stop where serving stops). Tools are
# listed in the system turn, one JSON schema a line; an assistant calls them with <tool_call>{json}</tool_call>
# and their results come back in a user turn inside <tool_result>...</tool_result> (no new marker tokens, so
# the tiny model's vocabulary is unchanged). A conversation without tools renders as it always did.
DEFAULT_CHAT_TEMPLATE = (
    "{% if tools %}<|system|>\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    'You can call these tools: write <tool_call>{"name": ..., "arguments": {...}}</tool_call> to call one.\n'
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% if not (tools and loop.first) %}<|system|>\n{{ m['content'] }}\n{% endif %}"
    "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}"
    "{% for c in m['tool_calls'] or [] %}{% set f = c['function'] if c['function'] is defined else c %}"
    "<tool_call>{{ {'name': f['name'], 'arguments': f['arguments']} | tojson }}</tool_call>{% endfor %}"
    "{{ eos_token if eos_token is defined else '<|end|>' }}\n"
    "{% elif m['role'] == 'tool' %}<|user|>\n<tool_result>\n{{ m['content'] }}\n</tool_result>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> Any:
    """Give a tokenizer without a chat template the default one (in place); returns the tokenizer."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer

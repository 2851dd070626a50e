"""Training renders a conversation exactly as serving does, with the tokenizer's own template or the default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import last_prompt_ids, tiny_tokenizer_with_template

from aigc.config import DataConfig, ModelConfig
from aigc.data.templates import encode_chat, render_for_training, render_prompt
from aigc.data.tokenizing import Tokenize
from aigc.models.chat_template import DEFAULT_CHAT_TEMPLATE
from aigc.models.loading import load_tokenizer
from aigc.serve.engine.prompts import PromptEncoder

TINY = Path(__file__).resolve().parents[1] / "assets" / "tiny-base"

# ChatML as Qwen writes it; <|im_end|> closes every turn and is the eos token.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVO = [
    {"role": "system", "content": "You are the shop's support agent."},
    {"role": "user", "content": "Where is order #4821? 我的订单在哪里？"},
    {"role": "assistant", "content": "It left the depot this morning."},
    {"role": "user", "content": "When will it arrive?"},
    {"role": "assistant", "content": "Tomorrow before noon."},
]
TOOLS = [{"type": "function", "function": {"name": "track", "description": "Track an order",
          "parameters": {"type": "object", "properties": {"order": {"type": "string"}}}}}]  # fmt: skip


@pytest.mark.parametrize("template", [CHATML, None], ids=["own-chatml", "default"])
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no-tools", "tools"])
def test_train_prompt_is_what_serving_encodes(tmp_path, template, tools):
    path = tiny_tokenizer_with_template(tmp_path, template)
    tok = load_tokenizer(path)
    assert tok.chat_template == (template or DEFAULT_CHAT_TEMPLATE)
    tk = Tokenize(ModelConfig(name_or_path=path), DataConfig(format="messages"))
    (row,) = tk({"raw": np.array([json.dumps({"messages": CONVO, "tools": tools})])}).to_pylist()
    assert row["ok"] and not row["last_turn_only"]

    served = encode_chat(tok, CONVO[:-1], tools)
    assert last_prompt_ids(row) == served
    if tools is None:
        assert PromptEncoder(tok).encode(CONVO[:-1]) == served  # what the engine encodes for a chat request
    assert tok.decode(last_prompt_ids(row)) == render_prompt(tok, CONVO[:-1], tools)  # the text, byte for byte
    eos = tok.eos_token
    assert tok.decode([i for i in row["labels"] if i != -100]) == f"It left the depot this morning.{eos}" \
        f"Tomorrow before noon.{eos}"  # fmt: skip


def test_default_template_is_the_tiny_models_and_prefix_stable():
    assert (TINY / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
    tok = load_tokenizer(str(TINY))
    calls = [{"type": "function", "function": {"name": "track", "arguments": {"order": "4821"}}}]
    convo = [*CONVO[:2], {"role": "assistant", "content": "", "tool_calls": calls},
             {"role": "tool", "content": "at the depot"}, *CONVO[2:]]  # fmt: skip
    for tools in (None, TOOLS):
        r = render_for_training(tok, convo, tools)
        assert not r.last_turn_only and len(r.spans) == 3
        for k, (start, end) in zip([2, 4, 6], r.spans, strict=True):  # each span: the turn's rendering, to eos
            assert r.text[:start] == render_prompt(tok, convo[:k], tools)
            assert r.text[start:end].endswith(tok.eos_token)
        tool_text = '<tool_call>{"name": "track", "arguments": {"order": "4821"}}</tool_call><|end|>'
        assert r.text[slice(*r.spans[0])] == tool_text
    plain, with_tools = render_prompt(tok, CONVO[:2]), render_prompt(tok, CONVO[:2], TOOLS)
    assert "tool" not in plain and with_tools.count("<|system|>") == 1
    assert with_tools.endswith(plain[plain.index("<|user|>") :]) and json.dumps(TOOLS[0]) in with_tools


def test_a_template_that_rewrites_history_trains_the_last_turn_only(tmp_path):
    # Not prefix-stable: the header counts the messages, so every turn changes the start of the text.
    template = "{{ messages | length }} messages\n" + DEFAULT_CHAT_TEMPLATE
    path = tiny_tokenizer_with_template(tmp_path, None)
    (Path(path) / "chat_template.jinja").write_text(template)
    tok = load_tokenizer(path)
    tk = Tokenize(ModelConfig(name_or_path=path), DataConfig(format="messages"))
    (row,) = tk({"raw": np.array([json.dumps({"messages": CONVO})])}).to_pylist()
    assert row["ok"] and row["last_turn_only"], row
    assert tok.decode([i for i in row["labels"] if i != -100]) == "Tomorrow before noon.<|end|>"
    assert last_prompt_ids(row) == encode_chat(tok, CONVO[:-1])

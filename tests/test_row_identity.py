"""The row work's output is pinned: any change to rendering (e.g. finding turn spans from one rendering) must
give byte- and id-identical rows to the two-render method on every template family and data format.

The digests were computed with the two-render ``render_for_training`` (prompt and full per assistant turn).
A digest covers every OUT_SCHEMA column of every row (ids, labels, counts, split, flags, key, quarantine
reasons), so a change in one id of one row fails the test.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_tokenizer_with_template

from aigc.config import DataConfig, ModelConfig
from aigc.data.templates import render_by_prefixes, render_chat, render_for_training
from aigc.data.tokenizing import Tokenize
from aigc.data.turn_spans import single_render_offsets
from aigc.demo.dataset import generate_support_examples
from aigc.models.chat_template import DEFAULT_CHAT_TEMPLATE
from aigc.models.loading import load_tokenizer

TINY = Path(__file__).resolve().parents[1] / "assets" / "tiny-base"

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATES = {
    "default": None,  # the tiny model's own (DEFAULT_CHAT_TEMPLATE): prefix-stable, tools in the system turn
    "chatml": CHATML,  # Qwen-style, eos <|im_end|>
    "rewrites-history": "{{ messages | length }} messages\n" + DEFAULT_CHAT_TEMPLATE,  # last turn only
}
TOOLS = [{"type": "function", "function": {"name": "track", "description": "Track an order",
          "parameters": {"type": "object", "properties": {"order": {"type": "string"}}}}}]  # fmt: skip
CONVO = [
    {"role": "system", "content": "You are the shop's support agent."},
    {"role": "user", "content": "Where is order #4821? 我的订单在哪里？"},
    {"role": "assistant", "content": "It left the depot this morning."},
    {"role": "user", "content": "When will it arrive?"},
    {"role": "assistant", "content": " Tomorrow before noon.\n"},
]


def _rows(fmt: str) -> list[str]:
    support = generate_support_examples(12, seed=3)
    if fmt == "alpaca":
        rows = [*support, {"instruction": "Sum", "input": "2 and 3", "output": "5", "system": "Be brief.",
                           "history": [["Hi", "Hello!"], ["Who are you?", "The shop's assistant."]]}]  # fmt: skip
    elif fmt == "messages":
        rows = [{"messages": CONVO}, {"messages": CONVO[1:3]}, {"messages": CONVO, "tools": TOOLS}]
        rows += [{"messages": [{"role": "user", "content": r["instruction"]},
                               {"role": "assistant", "content": r["output"]}]} for r in support]  # fmt: skip
        rows.append({"messages": [{"role": "user", "content": "no answer"}]})  # quarantined
    elif fmt == "sharegpt":
        roles = {"user": "human", "assistant": "gpt", "system": "system"}
        rows = [{"conversations": [{"from": roles[t["role"]], "value": t["content"]} for t in CONVO]}]
        rows += [{"conversations": [{"from": "human", "value": r["instruction"]},
                                    {"from": "gpt", "value": r["output"]}]} for r in support]  # fmt: skip
    else:
        rows = [{"text": r["instruction"] + " " + r["output"]} for r in support]
    return [json.dumps(r, ensure_ascii=False) for r in rows]


def row_digest(path: str, fmt: str, max_length: int) -> str:
    """sha256 (16 hex) of the Tokenize output of :func:`_rows` for ``fmt`` under ``max_length``."""
    tk = Tokenize(ModelConfig(name_or_path=path), DataConfig(format=fmt, max_length=max_length))
    table = tk({"raw": np.array(_rows(fmt), dtype=object)})
    return hashlib.sha256(json.dumps(table.to_pylist(), ensure_ascii=False).encode()).hexdigest()[:16]


# (template, format, max_length) -> digest from the two-render method; 40 tokens makes the truncate policy
# drop history and cut prompts.
GOLDEN: dict[tuple[str, str, int], str] = {
    ("default", "alpaca", 512): "42c8b6e5ca0e4a51",
    ("default", "alpaca", 40): "31a6cf8df5fb5455",
    ("default", "messages", 512): "fb6f75029fd84f64",
    ("default", "messages", 40): "934d7b38386f9bed",
    ("default", "sharegpt", 512): "6d02ac69ba68b630",
    ("default", "sharegpt", 40): "9ceec66707e8c19a",
    ("default", "text", 512): "4f33cc843d110887",
    ("default", "text", 40): "d8af28ee83764516",
    ("chatml", "alpaca", 512): "42f62c341b6b8187",
    ("chatml", "alpaca", 40): "bb04b6eeaf34d420",
    ("chatml", "messages", 512): "73609aefb0d4b38c",
    ("chatml", "messages", 40): "59e174427c391a61",
    ("chatml", "sharegpt", 512): "0162cc6521e74f14",
    ("chatml", "sharegpt", 40): "908a9933a44a4e72",
    ("chatml", "text", 512): "efebc465166e45b2",
    ("chatml", "text", 40): "b3a0856dc653bf74",
    ("rewrites-history", "alpaca", 512): "f22d20ae414dd932",
    ("rewrites-history", "alpaca", 40): "20e23892753da0c3",
    ("rewrites-history", "messages", 512): "8c1e8921189b1ac2",
    ("rewrites-history", "messages", 40): "e0f333d049589a7b",
    ("rewrites-history", "sharegpt", 512): "c7cc603f462a0cf6",
    ("rewrites-history", "sharegpt", 40): "523c210bf39e4de9",
    ("rewrites-history", "text", 512): "efebc465166e45b2",
    ("rewrites-history", "text", 40): "b3a0856dc653bf74",
}


@pytest.mark.parametrize("max_length", [512, 40])
@pytest.mark.parametrize("fmt", ["alpaca", "messages", "sharegpt", "text"])
@pytest.mark.parametrize("family", list(TEMPLATES))
def test_rows_are_identical_to_the_two_render_method(tmp_path, family, fmt, max_length):
    path = tiny_tokenizer_with_template(tmp_path, TEMPLATES[family])
    assert row_digest(path, fmt, max_length) == GOLDEN[(family, fmt, max_length)]


TOOL_CALL = [{"type": "function", "function": {"name": "track", "arguments": {"order": "4821"}}}]
CONVERSATIONS = [
    CONVO,
    CONVO[1:3],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "  "}],
    [*CONVO[:3], {"role": "system", "content": "Be kind."}, *CONVO[3:]],
    [CONVO[1], {"role": "assistant", "content": "", "tool_calls": TOOL_CALL},
     {"role": "tool", "content": '{"status": "shipped"}'}, {"role": "assistant", "content": "Shipped.\n\n"}],
    [CONVO[1], {"role": "assistant", "content": "a <|end|> b"}],  # eos text inside an answer
    [CONVO[1], {"role": "assistant", "content": "\x00 0 \x00"}],  # sentinel-like text: the prefix path
]  # fmt: skip


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no-tools", "tools"])
@pytest.mark.parametrize("family", list(TEMPLATES))
def test_one_render_equals_the_prefix_renderings(tmp_path, family, tools):
    """Field by field, on conversations the formats can produce (tool calls, a system turn mid-way, empty
    answers); the known templates take the one-render path, the others fall back to the prefix renderings."""
    tok = load_tokenizer(tiny_tokenizer_with_template(tmp_path, TEMPLATES[family]))
    for turns in CONVERSATIONS:
        one = single_render_offsets(tok.chat_template, turns, lambda m: render_chat(tok, m, tools))
        known = family != "rewrites-history" and "\x00" not in turns[-1]["content"]
        assert (one is not None) == known
        assert _outcome(render_for_training, tok, turns, tools) == _outcome(render_by_prefixes, tok, turns, tools)


def _outcome(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # the same error, with the same message, is the same outcome
        return type(exc), str(exc)

"""Row formats and the row work (aigc.data.tokenizing.Tokenize, called in-process without Ray) on the tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aigc.config import DataConfig, ModelConfig
from aigc.data.formats import Example, RowError, conversation_key, to_example
from aigc.data.tokenizing import Tokenize

TINY = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-base")
TOOLS = [{"name": "get_weather", "description": "天气 by city", "parameters": {"type": "object",
          "properties": {"city": {"type": "string"}}, "required": ["city"]}}]  # fmt: skip
CALL = {"name": "get_weather", "arguments": {"city": "北京"}}


# formats ---------------------------------------------------------------------------------------------------
def test_alpaca_joins_instruction_and_input_and_adds_system():
    ex = to_example({"instruction": "Translate", "input": "hola", "output": "hello", "system": "Be brief"}, "alpaca")
    assert ex.turns == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Translate\n\nhola"},
        {"role": "assistant", "content": "hello"},
    ]
    assert ex.tools is None and not ex.raw_text


def test_alpaca_history_comes_first_oldest_first():
    row = {"instruction": "q3", "output": "a3", "history": [["q1", "a1"], ["q2", "a2"]]}
    ex = to_example(row, "alpaca", system_prompt="sys")
    assert [(t["role"], t["content"]) for t in ex.turns] == [
        ("system", "sys"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"),
        ("user", "q3"), ("assistant", "a3"),
    ]  # fmt: skip


def test_messages_keep_every_turn_and_tool_calls():
    row = {"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
        {"role": "tool", "content": "20", "tool_call_id": "c1"},
        {"role": "assistant", "content": "20 度"},
    ], "tools": TOOLS}  # fmt: skip
    ex = to_example(row, "messages")
    assert ex.turns[1] == {"role": "assistant", "content": "",
                           "tool_calls": [{"type": "function", "function": CALL}]}  # fmt: skip
    assert ex.turns[2] == {"role": "tool", "content": "20", "tool_call_id": "c1"}
    assert ex.tools == [{"type": "function", "function": TOOLS[0]}]


def test_sharegpt_maps_roles_function_calls_and_tools_given_as_json():
    row = {"conversations": [
        {"from": "human", "value": "weather?"}, {"from": "function_call", "value": json.dumps(CALL)},
        {"from": "observation", "value": "20"}, {"from": "gpt", "value": "20 度"},
    ], "tools": json.dumps(TOOLS), "system": "S"}  # fmt: skip
    ex = to_example(row, "sharegpt")
    assert [t["role"] for t in ex.turns] == ["system", "user", "assistant", "tool", "assistant"]
    assert ex.turns[2]["tool_calls"] == [{"type": "function", "function": CALL}]
    assert ex.tools == [{"type": "function", "function": TOOLS[0]}]


def test_text_format_has_no_template():
    ex = to_example({"text": "plain text"}, "text")
    assert ex.raw_text and ex.turns == [] and ex.text == "plain text"


@pytest.mark.parametrize(
    ("row", "fmt", "reason", "detail"),
    [
        ({"instruction": "q"}, "alpaca", "missing_field", "missing field 'output'"),
        ({"instruction": "q", "output": "  "}, "alpaca", "empty_response", "answer is empty"),
        ({"instruction": "q", "output": 7}, "alpaca", "wrong_type", "field 'output' must be a string, got int"),
        ({"instruction": "", "output": "a"}, "alpaca", "empty_prompt", "'instruction' is empty"),
        ({"instruction": "q", "output": "a", "history": [["q"]]}, "alpaca", "wrong_type", "history[0] must be"),
        ({"instruction": "q", "output": "a", "history": [["q", " "]]}, "alpaca", "empty_response",
         "assistant turn 1"),
        ({"messages": []}, "messages", "wrong_type", "non-empty list"),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no_assistant_turn", "assistant"),
        ({"messages": [{"role": "bot", "content": "q"}]}, "messages", "bad_role", "messages[0].role"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "messages", "no_user_turn", "no user turn"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": "[{"},
         "messages", "bad_tools", "field 'tools' is not valid JSON"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
          "tools": [{"description": "no name"}]}, "messages", "bad_tools", "tools[0] must be a tool schema"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{oops"}]},
         "sharegpt", "bad_tool_call", "conversations[1].value is not valid JSON"),
        ({"conversations": [{"from": "human", "value": 1}, {"from": "gpt", "value": "a"}]}, "sharegpt",
         "wrong_type", "conversations[0].value must be a string"),
        ({"text": None}, "text", "missing_field", "missing field 'text'"),
    ],
)  # fmt: skip
def test_bad_rows_get_a_reason(row, fmt, reason, detail):
    with pytest.raises(RowError) as err:
        to_example(row, fmt)
    assert err.value.reason == reason
    assert detail in err.value.detail


def test_key_ignores_whitespace_and_unicode_composition_but_not_content():
    def key(q, a):
        return conversation_key(to_example({"instruction": q, "output": a}, "alpaca"))

    assert key("Where is  my\torder? ", "It ships\n today.") == key("Where is my order?", "It ships today.")
    assert key("caf\u00e9", "ok") == key("cafe\u0301", "ok")  # NFC
    assert key("Where is my order?", "It ships today.") != key("Where is my order?", "It ships tomorrow.")
    tools = Example(turns=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], tools=TOOLS)
    assert conversation_key(tools) != conversation_key(Example(turns=tools.turns))


# the row work ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenize():
    def make(**data) -> Tokenize:
        return Tokenize(ModelConfig(name_or_path=TINY), DataConfig(**data))

    return make


def run(tk: Tokenize, rows: list, **columns) -> list[dict]:
    raw = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    return tk({"raw": np.array(raw), **{k: np.array(v) for k, v in columns.items()}}).to_pylist()


def trained(tk: Tokenize, row: dict) -> list[str]:
    """The decoded runs of labelled tokens, in order."""
    runs, cur = [], []
    for i, lab in zip(row["input_ids"], row["labels"], strict=True):
        assert lab in (-100, i)
        if lab != -100:
            cur.append(i)
        elif cur:
            runs, cur = [*runs, cur], []
    return [tk.tok.decode(r) for r in [*runs, *([cur] if cur else [])]]


def test_every_assistant_turn_is_trained_and_nothing_else(tokenize):
    tk = tokenize(format="messages", system_prompt="Be kind.")
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there."},
             {"role": "user", "content": "bye"}, {"role": "assistant", "content": "Goodbye."}]  # fmt: skip
    (row,) = run(tk, [{"messages": convo}])
    assert row["ok"] and not row["last_turn_only"] and not row["truncated"]
    assert trained(tk, row) == ["Hello there.<|end|>", "Goodbye.<|end|>"]
    assert row["n_target_tokens"] == sum(lab != -100 for lab in row["labels"])
    text = tk.tok.decode(row["input_ids"])
    assert text.startswith("<|system|>\nBe kind.\n<|user|>\nhi\n") and text.endswith("Goodbye.<|end|>")


def test_alpaca_history_is_trained_in_every_turn(tokenize):
    tk = tokenize(format="alpaca")
    (row,) = run(tk, [{"instruction": "q2", "output": "a2", "history": [["q1", "a1"]], "system": "S"}])
    assert trained(tk, row) == ["a1<|end|>", "a2<|end|>"]


def test_sharegpt_tool_calls_are_trained_observations_are_not(tokenize):
    tk = tokenize(format="sharegpt")
    row = {"conversations": [
        {"from": "human", "value": "北京天气怎么样？"}, {"from": "function_call", "value": json.dumps(CALL)},
        {"from": "observation", "value": '{"temperature": 20}'}, {"from": "gpt", "value": "北京 20 度。"},
    ], "tools": json.dumps(TOOLS, ensure_ascii=False)}  # fmt: skip
    (out,) = run(tk, [row])
    call = json.dumps(CALL, ensure_ascii=False)
    assert trained(tk, out) == [f"<tool_call>{call}</tool_call><|end|>", "北京 20 度。<|end|>"]
    text = tk.tok.decode(out["input_ids"])
    assert json.dumps(TOOLS[0], ensure_ascii=False)[1:-1] in text  # the tools block, Chinese kept
    assert '<tool_result>\n{"temperature": 20}\n</tool_result>' in text and "北京天气怎么样？" in text


def test_chinese_text_survives_unchanged(tokenize):
    tk = tokenize(format="alpaca")
    q, a = "请问我的订单 #1234 什么时候发货？", "您的订单今天发货，预计 3 天内送达。"
    (row,) = run(tk, [{"instruction": q, "output": a}])
    assert q in tk.tok.decode(row["input_ids"]) and trained(tk, row) == [a + "<|end|>"]


def test_bad_rows_are_quarantined_with_their_reason_the_batch_goes_on(tokenize):
    tk = tokenize(format="sharegpt")
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    rows = [good, {**good, "tools": "not json"}, "{broken", {"conversations": [{"from": "human", "value": "q <|end|>"},
            {"from": "gpt", "value": "a"}]}, good]  # fmt: skip
    out = run(tk, rows, read_error=["", "", "", "", "decode_error"], read_detail=["", "", "", "", "bad utf-8"])
    assert [r["reason"] for r in out] == ["", "bad_tools", "invalid_json", "control_token", "decode_error"]
    assert [r["split"] == "quarantine" for r in out] == [False, True, True, True, True]
    assert out[4]["detail"] == "bad utf-8" and out[4]["raw"] == json.dumps(good)
    assert all(r["key"] == 0 and r["input_ids"] == [] for r in out[1:])


def test_source_picks_format_and_columns_and_is_passed_through(tokenize, tmp_path):
    tk = tokenize(path=[str(tmp_path / "a.jsonl"), {"path": str(tmp_path / "b.jsonl"), "format": "sharegpt",
                                                    "columns": {"dialog": "conversations"}}])  # fmt: skip
    rows = [{"instruction": "q", "output": "a"},
            {"dialog": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            {"instruction": "q", "output": "a"}]  # fmt: skip
    out = run(tk, rows, source=[0, 1, 1])
    assert [(r["ok"], r["source"], r["reason"]) for r in out] == [
        (True, 0, ""), (True, 1, ""), (False, 1, "missing_field")]  # fmt: skip
    assert out[0]["key"] == out[1]["key"] != 0  # the same conversation, from two formats


def test_whitespace_only_differences_share_a_key(tokenize):
    tk = tokenize(format="alpaca")
    rows = [{"instruction": "Where is my order?", "output": "It ships today."},
            {"instruction": "  Where is my\norder?", "output": "It ships  today. "},
            {"instruction": "Where is my order?", "output": "It ships tomorrow."}]  # fmt: skip
    keys = [r["key"] for r in run(tk, rows)]
    assert keys[0] == keys[1] != keys[2]


def _exchange(i: int) -> list[dict]:
    return [{"role": "user", "content": f"question {i} " + "word " * 6},
            {"role": "assistant", "content": f"answer {i}."}]  # fmt: skip


def test_truncate_drops_the_oldest_whole_exchanges_first(tokenize):
    convo = [{"role": "system", "content": "SYS"}, *(m for i in range(6) for m in _exchange(i))]
    (full,) = run(tokenize(format="messages"), [{"messages": convo}])
    tk = tokenize(format="messages", max_length=full["n_tokens"] - 10)
    (row,) = run(tk, [{"messages": convo}])
    assert row["ok"] and row["truncated"] and row["n_tokens"] <= full["n_tokens"] - 10
    text = tk.tok.decode(row["input_ids"])
    assert text.startswith("<|system|>\nSYS\n<|user|>\nquestion 1 ")  # exchange 0 gone whole, system kept
    assert trained(tk, row) == [f"answer {i}.<|end|>" for i in range(1, 6)]
    # the kept rows are exactly what the template renders for the shorter conversation
    shorter = [convo[0], *convo[3:]]
    assert text == tk.tok.apply_chat_template(shorter, tokenize=False)[: len(text)]


def test_truncate_then_cuts_tokens_and_drop_quarantines(tokenize):
    convo = [*_exchange(0), *_exchange(1)]
    tk = tokenize(format="messages", max_length=12)
    (row,) = run(tk, [{"messages": convo}])
    assert row["ok"] and row["truncated"] and row["n_tokens"] == 12
    assert trained(tk, row)[-1].startswith("answer 1")  # only the last answer's tokens are left to train
    (dropped,) = run(tokenize(format="messages", max_length=12, overflow="drop"), [{"messages": convo}])
    assert dropped["reason"] == "too_long" and dropped["detail"].endswith("> data.max_length=12")


def test_a_template_error_quarantines_only_its_row(tokenize):
    tk = tokenize(format="messages")
    tk.tok.chat_template = "{{ raise_exception('no') if messages[0]['content'] == 'x' }}" + tk.tok.chat_template
    out = run(tk, [{"messages": [{"role": "user", "content": c}, {"role": "assistant", "content": "a"}]}
                   for c in ("x", "y")])  # fmt: skip
    assert [r["reason"] for r in out] == ["template_error", ""] and "no" in out[0]["detail"]

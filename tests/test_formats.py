"""Row formats: each maps to a prompt conversation and a target, or is rejected with a reason."""

from __future__ import annotations

import pytest

from aigc.data.formats import RowError, to_example


def test_alpaca_joins_instruction_and_input_and_adds_system():
    ex = to_example({"instruction": "Translate", "input": "hola", "output": "hello", "system": "Be brief"}, "alpaca")
    assert ex.messages == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Translate\n\nhola"},
    ]
    assert ex.response == "hello"


def test_messages_multi_turn_targets_last_assistant_turn():
    row = {"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "goodbye"},
    ]}  # fmt: skip
    ex = to_example(row, "messages", system_prompt="sys")
    assert ex.messages[0] == {"role": "system", "content": "sys"}
    assert [m["content"] for m in ex.messages[1:]] == ["hi", "hello", "bye"]
    assert ex.response == "goodbye"


def test_sharegpt_maps_roles():
    ex = to_example({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt")
    assert ex.messages == [{"role": "user", "content": "q"}] and ex.response == "a"


def test_text_format_has_no_template():
    ex = to_example({"text": "plain text"}, "text")
    assert ex.raw_text and ex.messages == [] and ex.response == "plain text"


@pytest.mark.parametrize(
    ("row", "fmt", "reason", "detail"),
    [
        ({"instruction": "q"}, "alpaca", "missing_field", "missing field 'output'"),
        ({"instruction": "q", "output": "  "}, "alpaca", "empty_response", "answer is empty"),
        (
            {"instruction": "q", "output": 7},
            "alpaca",
            "wrong_type",
            "field 'output' must be a string, got int",
        ),
        ({"instruction": "", "output": "a"}, "alpaca", "empty_prompt", "'instruction' is empty"),
        ({"messages": []}, "messages", "wrong_type", "non-empty list"),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no_assistant_turn", "assistant"),
        ({"messages": [{"role": "bot", "content": "q"}]}, "messages", "bad_role", "messages[0].role"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "messages", "no_user_turn", "no user turn"),
        (
            {"conversations": [{"from": "human", "value": 1}, {"from": "gpt", "value": "a"}]},
            "sharegpt",
            "wrong_type",
            "conversations[0].value must be a string",
        ),
        ({"text": None}, "text", "missing_field", "missing field 'text'"),
    ],
)
def test_bad_rows_get_a_reason(row, fmt, reason, detail):
    with pytest.raises(RowError) as err:
        to_example(row, fmt)
    assert err.value.reason == reason
    assert detail in err.value.detail

"""Preference pairs (data.preference) through the row work and the preprocessing job, on the tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aigc.config import DataConfig, ModelConfig, load_config
from aigc.data.pair_tokenizing import TokenizePairs
from aigc.data.preprocess import preprocess, shards_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "assets" / "tiny-base")

PROMPT, CHOSEN, REJECTED = "Where is my order #4821?", "It left the warehouse today.", "No idea, sorry."
SHAPES = {
    "alpaca": {"instruction": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
    "sharegpt": {"conversations": [{"from": "human", "value": PROMPT}],
                 "chosen": {"from": "gpt", "value": CHOSEN}, "rejected": {"from": "gpt", "value": REJECTED}},
    "messages": {"messages": [{"role": "user", "content": PROMPT}],
                 "chosen": [{"role": "assistant", "content": CHOSEN}], "rejected": REJECTED},
}  # fmt: skip


def _tk(fmt: str = "alpaca", **data) -> TokenizePairs:
    return TokenizePairs(ModelConfig(name_or_path=TINY), DataConfig(format=fmt, preference=True, **data))


def _run(tk: TokenizePairs, rows: list) -> list[dict]:
    return tk({"raw": np.array([json.dumps(r) for r in rows])}).to_pylist()


def _answer(tk, ids, labels) -> str:
    assert all(lab in (-100, i) for i, lab in zip(ids, labels, strict=True))
    return tk.tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])


@pytest.mark.parametrize("fmt", list(SHAPES))
def test_every_shape_gives_the_same_pair_with_only_the_answers_labelled(fmt):
    tk = _tk(fmt)
    [row] = _run(tk, [SHAPES[fmt]])
    assert row["ok"], row["detail"]
    prompt = tk.tok(f"<|user|>\n{PROMPT}\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    chosen = tk.tok(CHOSEN + "<|end|>", add_special_tokens=False)["input_ids"]
    rejected = tk.tok(REJECTED + "<|end|>", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == prompt + chosen
    assert row["labels"] == [-100] * len(prompt) + chosen
    assert row["rejected_ids"] == prompt + rejected
    assert row["rejected_labels"] == [-100] * len(prompt) + rejected
    assert (row["n_tokens"], row["n_target_tokens"]) == (len(prompt) + max(len(chosen), len(rejected)),
                                                         len(chosen) + len(rejected))  # fmt: skip
    assert _answer(tk, row["input_ids"], row["labels"]) == CHOSEN + "<|end|>"
    # the three shapes are one pair: same key, same split
    alpaca = _run(_tk("alpaca"), [SHAPES["alpaca"]])[0]
    assert (row["key"], row["split"]) == (alpaca["key"], alpaca["split"])


def test_earlier_answers_of_the_history_are_prompt_not_labelled():
    history = [["Hi", "Hello! How can I help?"]]
    [row] = _run(_tk(), [{**SHAPES["alpaca"], "history": history, "system": "Be brief."}])
    assert _answer(_tk(), row["input_ids"], row["labels"]) == CHOSEN + "<|end|>"
    assert _answer(_tk(), row["rejected_ids"], row["rejected_labels"]) == REJECTED + "<|end|>"
    text = _tk().tok.decode(row["input_ids"])
    assert text.startswith("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello! How can I help?<|end|>\n")


def test_bad_pairs_are_quarantined_with_reasons():
    ok = SHAPES["alpaca"]
    rows = [
        {"instruction": PROMPT, "chosen": CHOSEN},  # missing rejected
        {**ok, "rejected": CHOSEN},  # the same answer twice
        {**ok, "chosen": ""},  # empty answer
        {**ok, "chosen": 7},  # not a string
        {**ok, "rejected": "fine <|end|> <|user|> now"},  # a control token
        {"instruction": PROMPT, "output": CHOSEN},  # an SFT row
        ok,
    ]
    out = _run(_tk(), rows)
    assert [(r["ok"], r["reason"]) for r in out] == [
        (False, "missing_field"), (False, "bad_pair"), (False, "empty_response"), (False, "wrong_type"),
        (False, "control_token"), (False, "missing_field"), (True, ""),
    ]  # fmt: skip
    assert out[0]["detail"] == "missing field 'rejected'"
    assert all(r["rejected_ids"] == [] and r["split"] == "quarantine" for r in out[:-1])
    convo = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
             "chosen": "b", "rejected": "c"}  # fmt: skip
    [bad] = _run(_tk("sharegpt"), [convo])
    assert (bad["reason"], bad["detail"]) == (
        "bad_pair",
        "'conversations' must end with the user's turn: the answers are 'chosen' and 'rejected'",
    )
    [role] = _run(_tk("messages"), [{**SHAPES["messages"], "rejected": {"role": "user", "content": "x"}}])
    assert (role["reason"], role["detail"]) == ("bad_role", "rejected.role must be the assistant's, got 'user'")


def _long_pair() -> dict:
    history = [[f"Question {i} about lamps and tables?", f"Answer {i}: we sell lamps and tables."] for i in range(4)]
    return {"instruction": PROMPT, "history": history, "chosen": " ".join([CHOSEN] * 6), "rejected": REJECTED}


def test_truncate_keeps_the_prompt_shared_and_cuts_both_answers_alike():
    full = _run(_tk(max_length=1024), [_long_pair()])[0]
    [row] = _run(_tk(max_length=48), [_long_pair()])
    assert row["ok"] and row["truncated"]
    c_prompt = row["labels"].index(next(x for x in row["labels"] if x != -100))
    r_prompt = row["rejected_labels"].index(next(x for x in row["rejected_labels"] if x != -100))
    assert c_prompt == r_prompt and row["input_ids"][:c_prompt] == row["rejected_ids"][:r_prompt]  # shared prompt
    assert max(len(row["input_ids"]), len(row["rejected_ids"])) == 48 == row["n_tokens"]
    # the longer (chosen) answer is cut from the right; the short rejected answer fits under the same cap: whole
    f_prompt = full["labels"].index(next(x for x in full["labels"] if x != -100))
    assert row["input_ids"][c_prompt:] == full["input_ids"][f_prompt : f_prompt + 48 - c_prompt]
    assert row["rejected_ids"][r_prompt:] == full["rejected_ids"][f_prompt:]
    # the oldest exchanges went first: the prompt still ends with the last question, and no history answer is kept
    text = _tk().tok.decode(row["input_ids"][:c_prompt])
    assert text.endswith(f"<|user|>\n{PROMPT}\n<|assistant|>\n") and "Answer 0" not in text


def test_drop_quarantines_a_pair_when_either_side_is_too_long():
    [row] = _run(_tk(max_length=48, overflow="drop"), [_long_pair()])
    assert (row["ok"], row["reason"]) == (False, "too_long")
    assert row["detail"].endswith("tokens > data.max_length=48")


def test_preference_config_is_checked_before_any_work():
    with pytest.raises(ValueError, match="needs unpacked rows of prompts and answers: set data.packing=false"):
        DataConfig(preference=True, packing=True)
    with pytest.raises(ValueError, match="has format 'text': use alpaca, sharegpt or messages"):
        DataConfig(preference=True, format="text")


def test_preprocessing_job_writes_pairs_counts_and_quarantine(ray_cluster, tmp_path):
    good = [{"instruction": f"Where is order #{1000 + i}?", "chosen": f"Order #{1000 + i} ships today.",
             "rejected": "Not sure."} for i in range(30)]  # fmt: skip
    bad = [{"instruction": "q", "chosen": "same", "rejected": "same"}, {"instruction": "q", "chosen": "a"}]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in good + bad + [good[0]]))  # the last: a duplicate
    cfg = load_config(None, [f"data.path={src}", f"model.name_or_path={TINY}", f"output_dir={tmp_path / 'out'}",
                             "data.val_fraction=0.25", "data.tokenizer_actors=1", "data.preference=true"])  # fmt: skip
    stats = preprocess(cfg.data, cfg.model, cfg.output_dir).stats
    assert (stats["rows_in"], stats["rows_kept"], stats["rows_duplicate"]) == (33, 30, 1)
    assert stats["rows_rejected"] == {"bad_pair": 1, "missing_field": 1}
    assert stats["preference"] is True and stats["rows_train"] + stats["rows_val"] == 30
    shards = Path(shards_dir(cfg.output_dir))
    train = pd.concat(pd.read_parquet(p) for p in sorted((shards / "train").glob("*.parquet")))
    assert list(train.columns) == ["input_ids", "labels", "n_tokens", "n_target_tokens", "rejected_ids",
                                   "rejected_labels"]  # fmt: skip
    assert len(train) == stats["rows_train"]
    for _, r in train.iterrows():
        n_prompt = int((np.asarray(r["labels"]) == -100).sum())
        assert list(r["input_ids"][:n_prompt]) == list(r["rejected_ids"][:n_prompt])
        assert (np.asarray(r["rejected_labels"][:n_prompt]) == -100).all()
    reasons = [json.loads(line)["reason"] for p in (shards / "quarantine").glob("*.json") for line in p.open()]
    assert sorted(reasons) == ["bad_pair", "missing_field"]


def test_sft_rows_under_data_preference_fail_before_any_ray_work(tmp_path):
    from aigc.data.reading import check_columns, list_input_files
    from aigc.errors import DataError

    src = tmp_path / "sft.jsonl"
    src.write_text(json.dumps({"instruction": PROMPT, "output": CHOSEN}) + "\n")
    data = DataConfig(path=str(src), preference=True)
    with pytest.raises(DataError, match="format 'alpaca' expects fields instruction, chosen, rejected"):
        check_columns(list_input_files(data), data)


def test_the_rows_aigc_feedback_export_pairs_writes_are_read_as_messages_pairs():
    """``aigc feedback export --pairs`` writes ``{messages, chosen: {role, content}, rejected: {role, content}}``."""
    row = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
        "chosen": {"role": "assistant", "content": CHOSEN},
        "rejected": {"role": "assistant", "content": REJECTED},
    }
    [out] = _run(_tk("messages"), [row])
    assert out["ok"], out["detail"]
    assert _tk().tok.decode(out["input_ids"]).startswith(f"<|system|>\nBe brief.\n<|user|>\n{PROMPT}")
    assert _answer(_tk(), out["rejected_ids"], out["rejected_labels"]) == REJECTED + "<|end|>"

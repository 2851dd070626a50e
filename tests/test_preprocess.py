"""The Ray Data preprocessing job on the shared local cluster, with the project's tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from aigc.config import load_config
from aigc.data.preprocess import preprocess
from aigc.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "assets" / "tiny-base")

GOOD = [{"instruction": f"Where is order #{1000 + i}?", "input": "", "output": f"Order #{1000 + i} ships today."}
        for i in range(40)]  # fmt: skip
BAD_LINES = [
    json.dumps({"instruction": "no answer"}),
    json.dumps({"instruction": "empty", "output": ""}),
    json.dumps({"instruction": "number", "output": 42}),
    '{"instruction": "broken',
]


def _cfg(tmp_path, path, *extra):
    return load_config(None, [f"data.path={path}", f"model.name_or_path={TINY}", f"output_dir={tmp_path / 'out'}",
                              "data.val_fraction=0.25", "data.tokenizer_actors=1", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def jsonl_run(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pre")
    src = tmp / "mixed.jsonl"
    lines = [json.dumps(r) for r in GOOD]
    for k, bad in enumerate(BAD_LINES):
        lines.insert(5 + 7 * k, bad)
    src.write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp, src)
    return cfg, preprocess(cfg.data, cfg.model, cfg.output_dir)


def test_stats_count_every_row(jsonl_run):
    _, res = jsonl_run
    s = json.loads((Path(res.data_dir) / "stats.json").read_text())
    assert s["rows_in"] == 44 and s["rows_kept"] == 40
    assert s["rows_rejected"] == {"missing_field": 1, "empty_response": 1, "wrong_type": 1, "invalid_json": 1}
    assert s["rows_in"] == s["rows_kept"] + sum(s["rows_rejected"].values())
    assert s["rows_train"] + s["rows_val"] == 40 and s["rows_val"] > 0
    assert s["tokens_total"] > s["target_tokens_total"] > 0
    assert (Path(res.data_dir) / "token_lengths.png").stat().st_size > 1000


def test_quarantine_keeps_bad_rows_with_reasons(jsonl_run):
    _, res = jsonl_run
    rows = [json.loads(line) for f in sorted((Path(res.data_dir) / "quarantine").glob("*.json"))
            for line in f.read_text().splitlines()]  # fmt: skip
    assert sorted(r["reason"] for r in rows) == [
        "empty_response",
        "invalid_json",
        "missing_field",
        "wrong_type",
    ]
    assert {r["raw"] for r in rows} == set(BAD_LINES)


def test_prompt_tokens_are_masked_and_target_ends_with_eos(jsonl_run):
    from transformers import AutoTokenizer

    cfg, res = jsonl_run
    tok = AutoTokenizer.from_pretrained(TINY)
    df = pd.concat([pd.read_parquet(Path(res.data_dir) / s) for s in ("train", "val")])
    assert len(df) == 40
    for ids, labels in zip(df["input_ids"], df["labels"], strict=True):
        ids, labels = list(ids), list(labels)
        n_prompt = labels.index(next(x for x in labels if x != -100))
        assert all(x == -100 for x in labels[:n_prompt]) and labels[n_prompt:] == ids[n_prompt:]
        prompt, target = tok.decode(ids[:n_prompt]), tok.decode(ids[n_prompt:])
        assert prompt.startswith("<|user|>\nWhere is order #") and prompt.endswith("<|assistant|>\n")
        assert target.endswith("ships today.<|end|>")
        order = prompt.split("#")[1].split("?")[0]
        assert f"Order #{order} ships today." in target


def _val_rows(out_dir) -> list[tuple[int, ...]]:
    val = pd.read_parquet(Path(out_dir) / "data" / "val")
    return sorted(tuple(x) for x in val["input_ids"])


def test_split_is_deterministic(ray_cluster, jsonl_run, tmp_path):
    """The same rows land in val on every run (a random split would pick other rows), and data.seed moves them."""
    cfg, res = jsonl_run
    again = preprocess(cfg.data, cfg.model, str(tmp_path / "again"))
    first = _val_rows(cfg.output_dir)
    assert 0 < len(first) < res.stats["rows_kept"]
    assert _val_rows(tmp_path / "again") == first
    assert again.stats["fingerprint"] == res.stats["fingerprint"]
    reseeded = cfg.data.model_copy(update={"seed": cfg.data.seed + 1})
    preprocess(reseeded, cfg.model, str(tmp_path / "reseeded"))
    assert _val_rows(tmp_path / "reseeded") != first


def test_parquet_csv_and_json_array_with_column_mapping(ray_cluster, tmp_path):
    rows = [{"question": r["instruction"], "answer": r["output"]} for r in GOOD[:10]]
    d = tmp_path / "in"
    d.mkdir()
    pd.DataFrame(rows[:4]).to_parquet(d / "a.parquet")
    pd.DataFrame(rows[4:7]).to_csv(d / "b.csv", index=False)
    (d / "c.json").write_text(json.dumps(rows[7:]))
    cfg = _cfg(tmp_path, d, "data.columns.question=instruction", "data.columns.answer=output")
    res = preprocess(cfg.data, cfg.model, cfg.output_dir)
    assert res.stats["rows_in"] == 10 and res.stats["rows_kept"] == 10 and res.stats["rows_rejected"] == {}


def test_input_errors_name_the_file_and_what_was_expected(ray_cluster, tmp_path):
    with pytest.raises(DataError, match="no such file or directory: .*missing.jsonl"):
        cfg = _cfg(tmp_path, tmp_path / "missing.jsonl")
        preprocess(cfg.data, cfg.model, cfg.output_dir)
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"unsupported file type .*data.txt.*expected one of .jsonl, .json"):
        cfg = _cfg(tmp_path, tmp_path / "data.txt")
        preprocess(cfg.data, cfg.model, cfg.output_dir)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("\n".join(json.dumps({"question": "q", "answer": "a"}) for _ in range(3)) + "\n")
    cfg = _cfg(tmp_path, wrong)
    with pytest.raises(DataError) as err:
        preprocess(cfg.data, cfg.model, cfg.output_dir)
    msg = str(err.value)
    assert "wrong.jsonl" in msg and "format 'alpaca' expects fields instruction, output" in msg
    assert "the first rows have answer, question" in msg and "data.columns" in msg


def test_too_long_rows_are_quarantined_and_all_rejected_is_an_error(ray_cluster, tmp_path):
    src = tmp_path / "long.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in GOOD[:5]) + "\n")
    cfg = _cfg(tmp_path, src, "data.max_length=8")
    with pytest.raises(DataError, match=r"all 5 rows were rejected \{'too_long': 5\}"):
        preprocess(cfg.data, cfg.model, cfg.output_dir)

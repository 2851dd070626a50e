"""The Ray Data preprocessing job on the shared local cluster, with the project's tiny tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aigc.config import load_config
from aigc.data.preprocess import preprocess, shards_dir
from aigc.data.sink import percentile
from aigc.data.tokenizing import fit_length
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
    rows = [json.loads(line) for f in sorted((Path(res.shards_dir) / "quarantine").glob("*.json"))
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
    df = pd.concat([pd.read_parquet(Path(res.shards_dir) / s) for s in ("train", "val")])
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
    val = pd.read_parquet(Path(shards_dir(str(out_dir))) / "val")
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


def test_too_long_rows_are_quarantined_under_drop_and_all_rejected_is_an_error(ray_cluster, tmp_path):
    src = tmp_path / "long.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in GOOD[:5]) + "\n")
    cfg = _cfg(tmp_path, src, "data.max_length=8", "data.overflow=drop")
    with pytest.raises(DataError, match=r"all 5 rows were rejected \{'too_long': 5\}"):
        preprocess(cfg.data, cfg.model, cfg.output_dir)


# length policy ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_prompt", "n_target", "want"),
    [
        (5, 3, (5, 3)),  # fits: unchanged
        (10, 3, (5, 3)),  # prompt cut from the left, answer whole
        (2, 20, (2, 6)),  # short prompt whole, answer cut from the right
        (20, 20, (4, 4)),  # both long: the prompt keeps half, the answer the rest
        (20, 1, (7, 1)),  # a prompt longer than the limit keeps its last tokens
        (0, 20, (0, 8)),  # text format: no prompt
    ],
)
def test_fit_length_cuts_prompt_left_then_answer_right(n_prompt, n_target, want):
    prompt, target = list(range(n_prompt)), list(range(100, 100 + n_target))
    p, t = fit_length(prompt, target, 8)
    assert (len(p), len(t)) == want
    assert p == prompt[len(prompt) - len(p) :] and t == target[: len(t)]


def test_length_percentiles_from_a_histogram_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 100, 101):
        values = rng.integers(0, 50, size=n)
        hist = np.bincount(values, minlength=64)
        for q in (0, 50, 95, 100):
            assert percentile(hist, q) == pytest.approx(np.percentile(values, q))


LIMIT = 40  # longer than every GOOD row, shorter than both LONG rows
LONG = [
    {"instruction": " ".join(f"word{i}" for i in range(60)), "output": "Short answer."},
    {"instruction": "Short question?", "output": " ".join(f"answer{i}" for i in range(60))},
]


@pytest.fixture(scope="module")
def long_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("long") / "long.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [*GOOD[:6], *LONG]) + "\n")
    return src


def test_truncate_keeps_too_long_rows_at_exactly_max_length(ray_cluster, long_src, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    cfg = _cfg(tmp_path, long_src, f"data.max_length={LIMIT}", "data.val_fraction=0")
    res = preprocess(cfg.data, cfg.model, cfg.output_dir)
    assert res.stats["rows_kept"] == 8 and res.stats["rows_truncated"] == 2 and res.stats["rows_rejected"] == {}
    assert res.stats["tokens_per_example"]["max"] == LIMIT and res.stats["overflow"] == "truncate"
    df = pd.read_parquet(Path(res.shards_dir) / "train")
    long_rows = [(list(i), list(lab)) for i, lab in zip(df["input_ids"], df["labels"], strict=True) if len(i) == LIMIT]
    assert len(long_rows) == 2
    texts = {}
    for ids, labels in long_rows:
        n_prompt = sum(1 for x in labels if x == -100)
        assert 0 < n_prompt < LIMIT and labels[n_prompt:] == ids[n_prompt:]
        texts[tok.decode(ids[n_prompt:])] = tok.decode(ids[:n_prompt])
    # long prompt: its oldest words are gone, its end and the whole answer are kept
    prompt = texts["Short answer.<|end|>"]
    assert prompt.endswith("word59\n<|assistant|>\n") and "word0 " not in prompt
    # long answer: the whole prompt is kept, the answer is cut from the right
    (answer,) = [t for t in texts if t.startswith("answer0 ")]
    assert texts[answer].startswith("<|user|>\nShort question?") and "answer59" not in answer


def test_drop_quarantines_too_long_rows(ray_cluster, long_src, tmp_path):
    cfg = _cfg(tmp_path, long_src, f"data.max_length={LIMIT}", "data.overflow=drop")
    res = preprocess(cfg.data, cfg.model, cfg.output_dir)
    s = res.stats
    assert s["rows_kept"] == 6 and s["rows_truncated"] == 0 and s["rows_rejected"] == {"too_long": 2}
    assert s["tokens_per_example"]["max"] <= LIMIT
    rows = [json.loads(line) for f in (Path(res.shards_dir) / "quarantine").glob("*.json")
            for line in f.read_text().splitlines()]  # fmt: skip
    assert {r["raw"] for r in rows} == {json.dumps(r) for r in LONG}
    assert all(r["detail"].endswith(f"tokens > data.max_length={LIMIT}") for r in rows)


# per-row robustness -------------------------------------------------------------------------------------


def test_a_row_whose_template_raises_is_quarantined(ray_cluster, tmp_path):
    """A chat template that rejects a conversation fails that row only, with the template's message."""
    tok_dir = tmp_path / "strict-tok"
    shutil.copytree(TINY, tok_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    template = (Path(TINY) / "chat_template.jinja").read_text()
    guard = (
        "{% if messages[0]['content'].startswith('FORBIDDEN') %}"
        "{{ raise_exception('no forbidden prompts') }}{% endif %}"
    )
    (tok_dir / "chat_template.jinja").write_text(guard + template)
    src = tmp_path / "rows.jsonl"
    rows = [*GOOD[:5], {"instruction": "FORBIDDEN question", "output": "an answer"}]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = _cfg(tmp_path, src, f"model.name_or_path={tok_dir}")
    res = preprocess(cfg.data, cfg.model, cfg.output_dir)
    s = res.stats
    assert s["rows_in"] == 6 and s["rows_kept"] == 5 and s["rows_rejected"] == {"template_error": 1}
    assert s["rows_in"] == s["rows_kept"] + sum(s["rows_rejected"].values())
    (bad,) = [json.loads(line) for f in (Path(res.shards_dir) / "quarantine").glob("*.json")
              for line in f.read_text().splitlines()]  # fmt: skip
    assert bad["reason"] == "template_error" and "no forbidden prompts" in bad["detail"]
    assert bad["raw"] == json.dumps(rows[-1])


# packing and re-runs --------------------------------------------------------------------------------------


def _rows_of(shards: str, split: str) -> pd.DataFrame:
    return pd.read_parquet(Path(shards) / split)


def test_packing_writes_fewer_fuller_rows_and_counts_examples(ray_cluster, tmp_path):
    src = tmp_path / "good.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in GOOD) + "\n")
    cfg = _cfg(tmp_path, src, "data.packing=true", "data.max_length=64")
    res = preprocess(cfg.data, cfg.model, cfg.output_dir)
    s, packed = res.stats, res.stats["packing"]
    assert s["rows_train"] + s["rows_val"] == 40 and s["rows_val"] > 0  # examples, as without packing
    parts = {split: _rows_of(res.shards_dir, split) for split in ("train", "val")}
    assert (len(parts["train"]), len(parts["val"])) == (packed["rows_train"], packed["rows_val"])
    assert packed["rows_train"] < s["rows_train"]
    df = pd.concat(parts.values())
    assert df["n_examples"].sum() == 40 and df["n_tokens"].max() <= 64
    assert df["n_tokens"].sum() == s["tokens_total"] and df["n_target_tokens"].sum() == s["target_tokens_total"]
    assert packed["efficiency"] == round(s["tokens_total"] / (len(df) * 64), 4) and packed["tokens_dropped"] == 0
    for ids, pos in zip(df["input_ids"], df["position_ids"], strict=True):
        assert len(pos) == len(ids) and pos[0] == 0


def test_shards_dir_reads_the_layout_before_shard_directories_and_names_missing_shards(tmp_path):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "stats.json").write_text(json.dumps({"rows_train": 1}))
    assert shards_dir(str(tmp_path)) == str(data)
    (data / "stats.json").write_text(json.dumps({"rows_train": 1, "shards": "shards-gone"}))
    with pytest.raises(DataError, match=r"shards-gone, named by .*stats.json, is gone: re-run `aigc preprocess`"):
        shards_dir(str(tmp_path))


def test_a_failed_rerun_leaves_the_previous_data_in_use(ray_cluster, tmp_path, monkeypatch):
    import aigc.data.preprocess as pre
    from aigc.data.shard_sets import load_datasets

    src = tmp_path / "good.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in GOOD[:12]) + "\n")
    cfg = _cfg(tmp_path, src)
    first = preprocess(cfg.data, cfg.model, cfg.output_dir)
    stats_path = Path(first.data_dir) / "stats.json"
    before = stats_path.read_text()
    train_before = _rows_of(first.shards_dir, "train")
    assert json.loads(before)["shards"] == Path(first.shards_dir).name

    # every row rejected: DataError, and the rejected rows are where the message says
    too_short = cfg.data.model_copy(update={"max_length": 8, "overflow": "drop"})
    with pytest.raises(DataError, match="all 12 rows were rejected") as err:
        preprocess(too_short, cfg.model, cfg.output_dir)
    where = Path(str(err.value).split("see ", 1)[1].split(" for each row")[0])
    quarantined = [json.loads(line) for f in where.glob("*.json") for line in f.read_text().splitlines()]
    assert len(quarantined) == 12 and {r["reason"] for r in quarantined} == {"too_long"}
    assert not (where.parent / "train").exists() and not (where.parent / "val").exists()

    # a failure after the rows were written: the new shards are removed
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    with monkeypatch.context() as m:
        m.setattr(pre, "_stats", broken)
        with pytest.raises(RuntimeError, match="boom"):
            preprocess(cfg.data, cfg.model, cfg.output_dir)
    left = sorted(p.name for p in Path(first.data_dir).glob("shards-*"))
    assert left == sorted([Path(first.shards_dir).name, where.parent.name])

    # the first run is untouched and still what training reads
    assert stats_path.read_text() == before
    pd.testing.assert_frame_equal(_rows_of(first.shards_dir, "train"), train_before)
    datasets, stats = load_datasets(cfg.output_dir, cfg.model)
    assert datasets["train"].count() == stats["rows_train"] == len(train_before)

    # the next good run takes over; the earlier sets stay within data.keep_shard_sets (tests/test_data_retention.py)
    second = preprocess(cfg.data, cfg.model, cfg.output_dir)
    kept = sorted(p.name for p in Path(first.data_dir).glob("shards-*"))
    assert kept == sorted([Path(first.shards_dir).name, where.parent.name, Path(second.shards_dir).name])
    assert shards_dir(cfg.output_dir) == second.shards_dir


# mixtures and dedup ---------------------------------------------------------------------------------------


def test_a_weighted_mixture_of_formats_dedups_and_counts_every_row(ray_cluster, tmp_path):
    """Two datasets in two formats and file types, one with exact (whitespace-only) duplicates, mixed 2 : 0.5."""
    alpaca = tmp_path / "support.jsonl"
    dup = {**GOOD[0], "output": "  Order #1000   ships today. "}  # the same answer up to whitespace
    alpaca.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [*GOOD[:20], GOOD[1], dup]) + "\n")
    chats = tmp_path / "chats.parquet"

    def chat(i: int) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": f"第{i}个问题：订单在哪里？"},
            {"role": "assistant", "content": f"订单{i}今天发货。"},
            {"role": "user", "content": "谢谢"},
            {"role": "assistant", "content": "不客气！"},
        ]

    convs = [chat(i) for i in range(40)]
    pd.DataFrame({"messages": convs}).to_parquet(chats)
    mixture = json.dumps(
        [{"path": str(alpaca), "weight": 2}, {"path": str(chats), "format": "messages", "weight": 0.5}]
    )
    cfg = _cfg(tmp_path, "x", f"data.path={mixture}", "data.val_fraction=0")
    res = preprocess(cfg.data, cfg.model, cfg.output_dir)
    s = res.stats
    assert s["rows_in"] == 62 and s["rows_duplicate"] == 2 and s["rows_kept"] == 60 and s["rows_rejected"] == {}
    assert s["rows_in"] == s["rows_kept"] + s["rows_duplicate"] + sum(s["rows_rejected"].values())
    (a, c) = s["sources"]
    assert (a["rows_in"], a["rows_kept"], a["rows_train_written"]) == (22, 20, 40)  # weight 2: every row twice
    assert (c["rows_in"], c["rows_kept"], c["format"]) == (40, 40, "messages")
    assert 10 <= c["rows_train_written"] <= 30  # weight 0.5: about half, chosen by a stable hash
    assert s["rows_train_written"] == 40 + c["rows_train_written"]
    df = pd.read_parquet(Path(res.shards_dir) / "train")
    assert len(df) == s["rows_train_written"]

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    texts = [tok.decode(ids) for ids in df["input_ids"]]
    chinese = [t for t in texts if "订单" in t]
    assert len(chinese) == c["rows_train_written"]
    # Chinese text survives unchanged, and every assistant turn of a multi-turn chat is trained
    i = next(int(t.split("第")[1].split("个")[0]) for t in chinese)
    row = next(k for k, t in enumerate(texts) if f"第{i}个问题" in t)
    trained = tok.decode([x for x in df["labels"][row] if x != -100])
    assert f"订单{i}今天发货。" in trained and "不客气！" in trained and "谢谢" not in trained
    # a re-run draws the same rows
    again = preprocess(cfg.data, cfg.model, cfg.output_dir).stats
    assert again["sources"] == s["sources"] and again["fingerprint"] == s["fingerprint"]


def test_dedup_off_keeps_duplicates(ray_cluster, tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [*GOOD[:5], *GOOD[:5]]) + "\n")
    res = preprocess(*_parts(_cfg(tmp_path, src, "data.dedup=false")))
    assert res.stats["rows_kept"] == 10 and res.stats["rows_duplicate"] == 0
    res = preprocess(*_parts(_cfg(tmp_path, src)))
    assert res.stats["rows_kept"] == 5 and res.stats["rows_duplicate"] == 5


def _parts(cfg):
    return cfg.data, cfg.model, cfg.output_dir


def test_the_default_pool_leaves_a_cpu_to_read_and_write_and_the_job_time_is_recorded(ray_cluster, tmp_path):
    """Unset data.tokenizer_actors: the pool grows to the cluster's CPUs minus one (the shared cluster has 4), and
    the read/dedup/write tasks (a quarter CPU each) run beside a full pool: several files and blocks go through,
    every row counted, within a bound (a pool holding every CPU would leave the reads waiting for ever)."""
    import threading

    import ray

    from aigc.data.preprocess import _actors
    from aigc.data.reading import IO_CPUS

    src = tmp_path / "in"
    src.mkdir()
    for f in range(4):  # one read task per file at least
        rows = [{"instruction": f"File {f} question {i}?", "output": f"Answer {f}-{i}."} for i in range(600)]
        (src / f"part-{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"data.path={src}", f"model.name_or_path={TINY}", f"output_dir={tmp_path / 'out'}",
                             "data.val_fraction=0.1"])  # fmt: skip
    assert cfg.data.tokenizer_actors is None
    cpus = int(ray.cluster_resources()["CPU"])
    assert _actors(cfg.data) == cpus - 1 and 0 < IO_CPUS <= 0.25
    done: dict = {}
    job = threading.Thread(target=lambda: done.update(res=preprocess(cfg.data, cfg.model, cfg.output_dir)), daemon=True)
    job.start()
    job.join(timeout=240)
    assert not job.is_alive(), "preprocessing did not finish in 240 s with the default tokenizer pool"
    s = done["res"].stats
    assert s["rows_in"] == s["rows_kept"] == 2400 and s["rows_train"] + s["rows_val"] == 2400
    assert 0 < s["seconds"] < 240

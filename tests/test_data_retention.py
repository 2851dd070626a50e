"""Shards stay while they are read: a new preprocessing run keeps the last ``data.keep_shard_sets`` shard sets, so a
training run or sweep streaming an earlier set is not cut off, and removes only the oldest beyond that count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aigc.config import load_config
from aigc.data.preprocess import _switch_to, preprocess, shards_dir
from aigc.data.shard_sets import load_datasets
from aigc.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "assets" / "tiny-base")
ROWS = [{"instruction": f"Where is order #{2000 + i}?", "input": "", "output": f"Order #{2000 + i} ships today."}
        for i in range(16)]  # fmt: skip


def _sets(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.glob("shards-*"))


def test_switch_keeps_the_newest_sets_and_never_the_one_in_use(tmp_path):
    names = [f"shards-20260101-00000{i}-aaaaaa" for i in range(5)]
    for name in [*names, "train", "quarantine"]:  # two directories of the layout before shard sets
        (tmp_path / name).mkdir()
    _switch_to(str(tmp_path), names[4], {"shards": names[4]}, keep=3)
    assert _sets(tmp_path) == names[2:]  # the set in use and the two before it
    assert not (tmp_path / "train").exists() and not (tmp_path / "quarantine").exists()
    assert json.loads((tmp_path / "stats.json").read_text()) == {"shards": names[4]}

    # A run that started first and switches last is in use: kept, though it is the oldest by name.
    (tmp_path / names[0]).mkdir()
    _switch_to(str(tmp_path), names[0], {"shards": names[0]}, keep=2)
    assert _sets(tmp_path) == [names[0], names[4]]
    _switch_to(str(tmp_path), names[0], {"shards": names[0]}, keep=1)
    assert _sets(tmp_path) == [names[0]]


def test_keep_shard_sets_is_at_least_one():
    assert load_config(None, []).data.keep_shard_sets == 3
    with pytest.raises(ConfigError, match="data.keep_shard_sets"):
        load_config(None, ["data.keep_shard_sets=0"])


def test_a_reader_of_earlier_shards_survives_two_reruns_and_older_sets_go(ray_cluster, tmp_path):
    src = tmp_path / "orders.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = load_config(None, [f"data.path={src}", f"model.name_or_path={TINY}", f"output_dir={tmp_path / 'out'}",
                             "data.val_fraction=0.25", "data.tokenizer_actors=1"])  # fmt: skip
    first = preprocess(cfg.data, cfg.model, cfg.output_dir)
    data_dir = Path(first.data_dir)

    # A training run opens the shards stats.json names now and streams them later (cache_data=false, a sweep).
    datasets, stats = load_datasets(cfg.output_dir, cfg.model)
    files = {p: p.read_bytes() for p in Path(first.shards_dir).rglob("*.parquet")}
    assert files and stats["rows_train"] > 0

    second = preprocess(cfg.data, cfg.model, cfg.output_dir)
    third = preprocess(cfg.data, cfg.model, cfg.output_dir)
    assert shards_dir(cfg.output_dir) == third.shards_dir  # the newest run is in use...
    # ...and the reader opened two runs ago still gets every row, from the same files, byte for byte.
    assert datasets["train"].count() == stats["rows_train"]
    assert len(datasets["train"].take_all()) == stats["rows_train"]
    assert {p: p.read_bytes() for p in Path(first.shards_dir).rglob("*.parquet")} == files
    names = [Path(r.shards_dir).name for r in (first, second, third)]
    assert _sets(data_dir) == names

    # A fourth run with the default count drops the oldest; keep_shard_sets=1 keeps the set in use alone.
    fourth = preprocess(cfg.data, cfg.model, cfg.output_dir)
    assert _sets(data_dir) == [*names[1:], Path(fourth.shards_dir).name]
    only = preprocess(cfg.data.model_copy(update={"keep_shard_sets": 1}), cfg.model, cfg.output_dir)
    assert _sets(data_dir) == [Path(only.shards_dir).name] and shards_dir(cfg.output_dir) == only.shards_dir
    # how long shards stay is not what they hold: the data fingerprint is the same
    assert only.stats["fingerprint"] == first.stats["fingerprint"]

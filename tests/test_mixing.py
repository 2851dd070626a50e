"""Dedup and mixture weights on tokenized rows (aigc.data.mixing)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from aigc.data.mixing import KeySet, copies_for, expand_copies, mark_rows


def test_weights_give_whole_copies_plus_a_stable_fraction():
    keys = np.arange(20_000, dtype=np.int64) * 7919
    for w in (0.25, 1.0, 2.0, 2.5):
        c = copies_for(keys, np.full(len(keys), w), seed=0)
        assert set(np.unique(c)) <= {int(np.floor(w)), int(np.floor(w)) + 1}
        assert c.mean() == pytest.approx(w, abs=0.02)
        assert (copies_for(keys, np.full(len(keys), w), seed=0) == c).all()  # the same rows on every run
    quarter = copies_for(keys, np.full(len(keys), 0.25), seed=0)
    assert (quarter != copies_for(keys, np.full(len(keys), 0.25), seed=1)).any()  # the seed draws another quarter


def _rows(keys, splits, sources):
    return pa.table(
        {
            "split": pa.array(splits, pa.string()),
            "key": pa.array(keys, pa.int64()),
            "source": pa.array(sources, pa.int32()),
            "input_ids": pa.array([[k] for k in keys], pa.list_(pa.int32())),
        }
    )


def test_mark_rows_keeps_the_first_copy_of_a_key_and_weights_train_rows_only(ray_cluster):
    import ray

    keyset = ray.remote(KeySet).remote()
    first = mark_rows(_rows([1, 2, 3], ["train", "val", "quarantine"], [0, 1, 0]), keyset, [3.0, 2.0], seed=0)
    assert first["split"].to_pylist() == ["train", "val", "quarantine"]
    assert first["copies"].to_pylist() == [3, 1, 0]  # val rows are never resampled; quarantine rows not written
    # a later batch: key 1 and 2 are duplicates (in another split too), 4 is new and repeated inside the batch
    second = mark_rows(_rows([1, 4, 4, 2], ["train", "train", "val", "val"], [0, 0, 1, 1]), keyset, [3.0, 2.0], 0)
    assert second["split"].to_pylist() == ["duplicate", "train", "duplicate", "duplicate"]
    assert second["copies"].to_pylist() == [0, 3, 0, 0]
    assert ray.get(keyset.size.remote()) == 3
    # without dedup, nothing is marked
    again = mark_rows(_rows([1, 1], ["train", "train"], [0, 0]), None, [1.0], seed=0)
    assert again["split"].to_pylist() == ["train", "train"] and again["copies"].to_pylist() == [1, 1]


def test_expand_copies_repeats_rows():
    t = _rows([5, 6, 7], ["train"] * 3, [0] * 3).append_column("copies", pa.array([2, 0, 1], pa.int32()))
    out = expand_copies(t)
    assert out["key"].to_pylist() == [5, 5, 7] and "copies" not in out.column_names

"""Packing (data.packing): what a packed row holds, and that the model sees each packed example alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from aigc.data.packing import is_document, pack, pack_documents, pack_examples, plan_rows
from aigc.train.losses import collate, token_losses

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "assets" / "tiny-base")
IDS = pa.list_(pa.int32())


def _examples(rng: np.random.Generator, n: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Chat-like examples: a prompt (label -100) then an answer (label = token)."""
    out = []
    for _ in range(n):
        total = int(rng.integers(2, max_length + 1))
        n_prompt = int(rng.integers(1, total))
        ids = rng.integers(2, 1600, size=total).tolist()
        out.append((ids, [-100] * n_prompt + ids[n_prompt:]))
    return out


def _table(rows: list[tuple[list[int], list[int]]]) -> pa.Table:
    return pa.table({"input_ids": pa.array([r[0] for r in rows], IDS), "labels": pa.array([r[1] for r in rows], IDS)})


def _pieces(packed: pa.Table) -> list[tuple[list[int], list[int]]]:
    """Each packed row cut where its position ids restart: (ids, labels) of every piece."""
    out = []
    for row in packed.to_pylist():
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:], strict=False):
            assert row["position_ids"][a:b] == list(range(b - a))
            out.append((row["input_ids"][a:b], row["labels"][a:b]))
    return out


def _trained(labels: list[int]) -> int:
    """Tokens that get a loss: a label other than -100 with a token before it in the same sequence."""
    return sum(x != -100 for x in labels[1:])


def test_packing_examples_conserves_every_trained_token_and_fits_max_length():
    rng = np.random.default_rng(0)
    rows = _examples(rng, 200, 48)
    packed = pack_examples(_table(rows), 48)
    assert max(packed["n_tokens"].to_pylist()) <= 48
    assert all(
        len(r) == n for r, n in zip(packed["input_ids"].to_pylist(), packed["n_tokens"].to_pylist(), strict=True)
    )
    pieces = _pieces(packed)
    assert sorted(map(tuple, (p[0] for p in pieces))) == sorted(tuple(r[0]) for r in rows)
    for ids, labels in pieces:  # each piece is one example whole; only its first label (never trained) is -100
        (orig,) = [r for r in rows if r[0] == ids][:1]
        assert labels[1:] == orig[1][1:] and labels[0] == -100
    assert sum(packed["n_target_tokens"].to_pylist()) == sum(_trained(r[1]) for r in rows)
    assert sum(packed["n_examples"].to_pylist()) == len(rows)
    tokens = sum(len(r[0]) for r in rows)
    assert packed.num_rows < len(rows) and tokens / (packed.num_rows * 48) > 0.9  # rows are nearly full


def test_plan_rows_refuses_an_example_longer_than_a_row():
    assert sorted(map(sorted, plan_rows(np.array([5, 4, 3, 3, 2, 1]), 6))) == [[0, 5], [1, 4], [2, 3]]
    with pytest.raises(ValueError, match="an example of 9 tokens cannot be packed into rows of 8"):
        plan_rows(np.array([3, 9]), 8)


def test_documents_are_cut_into_blocks_of_exactly_max_length():
    rng = np.random.default_rng(1)
    docs = [rng.integers(2, 1600, size=int(n)).tolist() for n in rng.integers(1, 70, size=40)]  # some > 32
    packed, dropped = pack_documents(_table([(d, d) for d in docs]), 32)
    stream = [t for d in docs for t in d]
    assert set(packed["n_tokens"].to_pylist()) == {32} and dropped == len(stream) % 32
    assert [t for r in packed["input_ids"].to_pylist() for t in r] == stream[: len(stream) - dropped]
    # positions restart at every document start and at every block start; those tokens are not targets
    doc_starts = set(np.cumsum([0, *map(len, docs)])[:-1].tolist())
    for b, row in enumerate(packed.to_pylist()):
        for i, (tok, lab, pos) in enumerate(zip(row["input_ids"], row["labels"], row["position_ids"], strict=True)):
            starts_piece = i == 0 or 32 * b + i in doc_starts
            assert (pos == 0) == starts_piece
            assert lab == (-100 if starts_piece else tok)


def test_pack_tells_documents_from_examples_by_their_labels():
    rng = np.random.default_rng(2)
    examples = _examples(rng, 10, 16)
    docs = [(d, d) for d in (rng.integers(2, 1600, size=20).tolist() for _ in range(3))]
    table = _table(examples + docs)
    assert is_document(table["labels"]).tolist() == [False] * 10 + [True] * 3
    packed, dropped = pack(table, 16)
    assert dropped == 60 % 16
    assert sum(packed["n_tokens"].to_pylist()) == sum(len(r[0]) for r in examples) + 60 - dropped


def test_collate_pads_position_ids_and_leaves_out_the_attention_mask():
    rows = {"input_ids": [[5, 6, 7], [8]], "labels": [[-100, 6, 7], [-100]], "position_ids": [[0, 1, 0], [0]]}
    batch = collate({k: np.array(v, dtype=object) for k, v in rows.items()}, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    plain = collate({k: np.array(rows[k], dtype=object) for k in ("input_ids", "labels")}, pad_id=0)
    assert set(plain) == {"input_ids", "labels", "attention_mask"}
    assert plain["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("wrap", ["base", "lora"])
def test_a_packed_row_gives_each_example_the_loss_it_has_alone(wrap):
    """Per-token losses of packed rows (through the training loop's collate and loss) equal those of each
    example run on its own: no attention across examples. Plain causal attention over the same rows differs."""
    from aigc.models.loading import apply_lora, load_base_model

    torch.manual_seed(0)
    model = load_base_model(TINY, "float32")
    if wrap == "lora":
        model = apply_lora(model, 4, 8, 0.0, "all-linear")
    model.train()  # training mode, as in the loop (dropout is 0 in the tiny model and in this LoRA)
    rows = _examples(np.random.default_rng(3), 9, 24)
    packed = pack_examples(_table(rows), 48).to_pydict()
    assert max(packed["n_examples"]) > 1
    batch = collate({k: np.array(v, dtype=object) for k, v in packed.items()}, pad_id=0)
    with torch.no_grad():
        loss, counted = token_losses(model, batch)
        alone = {}
        for ids, labels in rows:
            one = collate({"input_ids": np.array([ids], dtype=object), "labels": np.array([labels], dtype=object)}, 0)
            lo, c = token_losses(model, one)
            alone[tuple(ids)] = lo[0][c[0]]
        mixed, _ = token_losses(
            model, {**batch, "position_ids": None, "attention_mask": torch.ones_like(batch["input_ids"])}
        )

    got, want, n_checked = [], [], 0
    for r, row_ids in enumerate(packed["input_ids"]):
        starts = [i for i, p in enumerate(packed["position_ids"][r]) if p == 0] + [len(row_ids)]
        for a, b in zip(starts, starts[1:], strict=False):
            got.append(loss[r, a : b - 1][counted[r, a : b - 1]])  # losses predicting tokens a+1 .. b-1
            want.append(alone[tuple(row_ids[a:b])])
            n_checked += 1
    assert n_checked == len(rows)
    torch.testing.assert_close(torch.cat(got), torch.cat(want), atol=1e-5, rtol=1e-5)
    assert int(counted.sum()) == sum(_trained(r[1]) for r in rows)
    assert not torch.allclose(mixed[counted], loss[counted], atol=1e-3)  # the test would see cross-attention

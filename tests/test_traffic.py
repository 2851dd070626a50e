"""Traffic splits between versions (``aigc traffic``): the alias records, resolution and per-request picks, the
CLI, and each version's ratings side by side (``aigc feedback compare``). The served path (answers named by
the version that wrote them, weights moved under load) is in tests/test_feedback.py."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from aigc.cli import main
from aigc.errors import RegistryError
from aigc.feedback import FeedbackRequest, FeedbackStore
from aigc.feedback.compare import compare_table, compare_versions
from aigc.registry import Registry
from aigc.serve.resolver import pick


def _adapter(d: Path, tag: str) -> str:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "tag": tag}))
    (d / "adapter_model.safetensors").write_bytes(b"weights-" + tag.encode())
    return str(d)


@pytest.fixture
def reg(tmp_path) -> Registry:
    r = Registry(str(tmp_path / "registry"))
    for i in (1, 2, 3):
        r.register("bot", _adapter(tmp_path / f"a{i}", str(i)), base_model="base")
    return r


def test_a_split_alias_resolves_to_its_versions_and_readers_that_do_not_pick_get_the_primary(reg):
    reg.promote("bot:v2")
    alias, before = reg.set_traffic("bot", {2: 90, 3: 10})
    assert (alias.version, alias.weights, alias.shown_target) == (2, {2: 90, 3: 10}, "v2=90 v3=10")
    assert before.version == 2 and before.weights is None
    assert reg.resolve("bot").version == 2  # the primary: the largest weight
    assert [(e.model_id, w) for e, w in reg.resolve_split("bot")] == [("bot:v2", 90), ("bot:v3", 10)]
    assert [(e.model_id, w) for e, w in reg.resolve_split("bot:v3")] == [("bot:v3", 1)]  # a version is itself
    assert [(e.model_id, w) for e, w in reg.resolve_split("bot:latest")] == [("bot:v3", 1)]

    reg.set_traffic("bot", {2: 50, 3: 50})
    assert reg.resolve("bot").version == 3  # a tie: the newest
    reg.set_traffic("bot", {3: 100, 1: 0})  # one version left: a plain promote
    assert reg.aliases()[0].weights is None and reg.resolve("bot").version == 3
    # Rollback walks back through the history, splits restored as they were.
    assert reg.rollback("bot")[0].shown_target == "v2=50 v3=50"
    assert reg.rollback("bot")[0].shown_target == "v2=90 v3=10"
    assert reg.rollback("bot")[0].shown_target == "bot:v2"
    # A promote ends a split; a named alias splits on its own.
    reg.set_traffic("bot", {1: 1, 3: 3}, alias="canary")
    assert reg.resolve("bot:canary").version == 3 and reg.resolve("bot").version == 2
    reg.promote("bot:v1", alias="canary")
    assert [(e.model_id, w) for e, w in reg.resolve_split("bot:canary")] == [("bot:v1", 1)]


@pytest.mark.parametrize(
    "weights, message",
    [
        ({2: 90, 7: 10}, "bot has no published version v7 (versions: [1, 2, 3])"),
        ({2: 0, 3: 0}, "traffic weights must be whole numbers >= 0 with at least one above 0, e.g. v3=90 v4=10; "
                       "got v2=0 v3=0"),
        ({2: -5, 3: 10}, "got v2=-5 v3=10"),
        ({2: 0.5, 3: 10}, "got v2=0.5 v3=10"),
    ],
)  # fmt: skip
def test_bad_splits_are_refused_and_change_nothing(reg, weights, message):
    with pytest.raises(RegistryError) as err:
        reg.set_traffic("bot", weights)
    assert message in str(err.value)
    assert reg.aliases() == []


def test_rollback_to_a_split_refuses_a_version_no_longer_published(reg, tmp_path):
    import shutil

    reg.set_traffic("bot", {1: 50, 2: 50})
    reg.promote("bot:v3")
    shutil.rmtree(Path(reg.root) / "bot" / "v1")
    with pytest.raises(RegistryError, match="bot cannot roll back to v1: it is no longer published"):
        reg.rollback("bot")


def test_picks_follow_the_weights_and_stick_to_a_key(reg):
    split = reg.resolve_split("bot:v1") + reg.resolve_split("bot:v2")
    split = [(split[0][0], 80), (split[1][0], 20)]
    by_user = Counter(pick(split, "bot", f"user-{i}").version for i in range(2000))
    assert 0.75 < by_user[1] / 2000 < 0.85  # hashed keys spread by weight
    unkeyed = Counter(pick(split, "bot").version for i in range(2000))
    assert 0.75 < unkeyed[1] / 2000 < 0.85
    for i in range(20):  # the same key, the same version, every time
        assert len({pick(split, "bot", f"user-{i}").version for _ in range(10)}) == 1
    # Moving 10 points of weight moves only some keys (those whose point fell in the moved range).
    moved = [(split[0][0], 70), (split[1][0], 30)]
    changed = sum(pick(split, "bot", f"user-{i}") != pick(moved, "bot", f"user-{i}") for i in range(2000))
    assert 0.05 < changed / 2000 < 0.15


def test_cli_traffic_and_registry_listing(reg, capsys):
    common = [f"registry_dir={reg.root}"]
    assert main(["traffic", "bot", "v2=90", "v3=10", *common]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[traffic] bot -> v2=90 v3=10 (was unset (latest)); a running app follows within")
    assert main(["registry", *common]) == 0
    assert "alias bot -> v2=90 v3=10 (before: -)" in capsys.readouterr().out
    assert main(["registry", "--json", *common]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r for r in rows if "alias" in r] == [
        {"alias": "bot", "target": "bot:v2", "previous": [], "weights": {"v2": 90, "v3": 10}}
    ]
    assert main(["promote", "bot:v3", *common]) == 0
    assert capsys.readouterr().out.strip() == "[promote] bot -> bot:v3 (was v2)"
    assert main(["rollback", "bot", *common]) == 0
    assert capsys.readouterr().out.strip() == "[rollback] bot -> v2=90 v3=10 (was v3)"
    assert main(["traffic", "bot", "v2=ninety", *common]) == 2
    assert "expected vN=WEIGHT with a whole number (e.g. v4=10), got 'v2=ninety'" in capsys.readouterr().err
    assert main(["traffic", "bot", "v2=50", "v2=50", *common]) == 2
    assert "each version may be named once" in capsys.readouterr().err
    assert main(["traffic", "bot", "v2:90", *common]) == 2
    assert "name each version's share of the traffic, e.g. aigc traffic" in capsys.readouterr().err
    assert main(["traffic", "bot", "v2:90", "v3=10", *common]) == 2  # not a weight: an override, a bad one
    assert "v2:90" in capsys.readouterr().err
    assert main(["traffic", "bot", "v9=10", *common]) == 1
    assert "aigc traffic: bot has no published version v9 (versions: [1, 2, 3])" in capsys.readouterr().err


def _answer(store: FeedbackStore, n: int, model: str, rating: int | None, correction: str | None = None) -> None:
    cid = f"chatcmpl-{n:032x}"
    messages = [{"role": "user", "content": "Where is my parcel?"}]
    store.capture({"id": cid, "object": "chat.completion", "created": n, "model": model, "key_name": None,
                   "messages": messages, "answer": f"answer {n}"})  # fmt: skip
    if rating is not None:
        store.add_feedback(FeedbackRequest(id=cid, rating=rating, correction=correction))


def test_feedback_compare_puts_each_versions_ratings_side_by_side(tmp_path, capsys):
    store = FeedbackStore(str(tmp_path / "out" / "feedback"))
    ratings = {"bot:v3": [1, 1, 0, -1], "bot:v10": [1, 1, 1, 1, 1, -1], "other:v1": [-1], "bot": [1]}
    n = 0
    for model, rs in ratings.items():
        for r in rs:
            n += 1
            _answer(store, n, model, r, correction="Use the link." if (model, r) == ("bot:v3", -1) else None)
    _answer(store, 99, "bot:v3", None)  # captured, never rated: not counted
    rows = compare_versions(store, "bot")
    assert [(v.model, v.rated, v.good, v.neutral, v.bad, v.corrected) for v in rows] == [
        ("bot:v3", 4, 2, 1, 1, 1), ("bot:v10", 6, 5, 0, 1, 0)
    ]  # fmt: skip
    assert rows[0].mean == 0.25 and round(rows[1].mean, 4) == 0.6667
    low, high = rows[1].good_interval
    assert round(low, 3) == 0.436 and round(high, 3) == 0.970  # Wilson, 5 of 6
    table = compare_table(rows).splitlines()
    assert table[1].split() == ["bot:v3", "4", "2", "1", "1", "1", "+0.25", "50%", "(15%-85%)"]

    assert main(["feedback", "compare", "bot", f"output_dir={tmp_path / 'out'}"]) == 0
    assert capsys.readouterr().out.splitlines() == table
    assert main(["feedback", "compare", "bot", "--json", f"output_dir={tmp_path / 'out'}"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["model"] == "bot:v3" and first["good_share_95"] == [0.15, 0.85]
    assert main(["feedback", "compare", "nobody", f"output_dir={tmp_path / 'out'}"]) == 0
    assert capsys.readouterr().out.strip() == "[feedback] no rated answers of nobody yet"

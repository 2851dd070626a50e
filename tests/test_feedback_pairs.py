"""Feedback -> preference pairs (``aigc feedback export --pairs``): which pairs are made, in which order, and
what is left out, counted by reason."""

from __future__ import annotations

import json
from pathlib import Path

from aigc.cli import main
from aigc.data.formats import to_example
from aigc.feedback import FeedbackRequest, FeedbackStore, export_pairs
from aigc.serve.moderation import RulePolicy

SYSTEM = {"role": "system", "content": "Be brief."}


def _cid(n: int, prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{n:032x}"


def _capture(store: FeedbackStore, n: int, question: str, answer: str, object_: str = "chat.completion") -> str:
    cid = _cid(n, "chatcmpl" if object_ == "chat.completion" else "cmpl")
    record = {"id": cid, "object": object_, "created": n, "model": "m", "key_name": None, "answer": answer}
    if object_ == "chat.completion":
        record["messages"] = [SYSTEM, {"role": "user", "content": question}]
    else:
        record["prompt"] = question
    store.capture(record)
    return cid


def _rate(store: FeedbackStore, cid: str, rating: int, correction: str | None = None, key: str | None = None):
    store.add_feedback(FeedbackRequest(id=cid, rating=rating, correction=correction), key)


def _pairs(path: str) -> list[tuple[str, str, str]]:
    """(question, chosen, rejected) of each written pair, checking each row's shape on the way."""
    out = []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        assert set(row) == {"messages", "chosen", "rejected"} and row["messages"][0] == SYSTEM
        assert row["chosen"]["role"] == row["rejected"]["role"] == "assistant"
        out.append((row["messages"][-1]["content"], row["chosen"]["content"], row["rejected"]["content"]))
    return out


def test_pairs_from_corrections_and_opposite_ratings_with_what_was_left_out(tmp_path):
    store = FeedbackStore(str(tmp_path / "fb"))
    # A correction beats the answer it corrects (whatever the rating).
    _rate(store, _capture(store, 1, "Where is my parcel?", "No idea."), -1, "Use the tracking link.")
    # Same prompt, opposite ratings: each good answer over each bad one (and the corrected answer, rated -1,
    # takes part as a bad answer too).
    _rate(store, _capture(store, 2, "Where is my parcel?", "It ships today."), 1)
    _rate(store, _capture(store, 3, "Where is my parcel?", "Ask someone else."), -1)
    # A tie, a one-sided prompt (good and neutral), a single rating, the same text rated both ways.
    _rate(store, _capture(store, 4, "Can I return it?", "Yes, within 30 days."), 1)
    _rate(store, _capture(store, 5, "Can I return it?", "Yes, in 30 days."), 1)
    _rate(store, _capture(store, 6, "Do you ship abroad?", "We do."), 1)
    _rate(store, _capture(store, 7, "Do you ship abroad?", "Maybe."), 0)
    _rate(store, _capture(store, 8, "Opening hours?", "9 to 5."), 1)
    _rate(store, _capture(store, 9, "Refunds?", "Within a week."), 1)
    _rate(store, _capture(store, 10, "Refunds?", "Within a week. "), -1)
    # Not pairs at all: a text completion, a correction equal to the answer, a flagged correction.
    _rate(store, _capture(store, 11, "Hello", "Hi", object_="text_completion"), 1)
    _rate(store, _capture(store, 12, "Hi there", "Hello!"), -1, "Hello!")
    _rate(store, _capture(store, 13, "My card?", "Which card?"), -1, "Card 4111111111111111 is on file.")
    _capture(store, 14, "Never rated", "-")  # not looked at

    policy = RulePolicy({"pii": [r"\b\d{16}\b"]})
    res = export_pairs(store, str(tmp_path / "pairs.jsonl"), policy=policy)
    assert _pairs(res.path) == [
        ("Where is my parcel?", "Use the tracking link.", "No idea."),  # corrections first
        ("Where is my parcel?", "It ships today.", "No idea."),  # then ratings, in capture order
        ("Where is my parcel?", "It ships today.", "Ask someone else."),
    ]
    assert (res.pairs, res.from_corrections, res.from_ratings) == (3, 1, 2)
    assert res.skipped == {
        "correction_flagged:pii": 1,
        "no_opposite_rating": 1,  # "Do you ship abroad?": good and neutral
        "same_answer": 2,  # "Refunds?" rated both ways; "Hi there" corrected to itself
        "single_rating": 1,  # "Opening hours?"
        "text_completion": 1,
        "tie": 1,  # "Can I return it?": both good
    }
    # Every pair's two conversations are rows preprocessing accepts.
    for line in Path(res.path).read_text().splitlines():
        row = json.loads(line)
        for side in ("chosen", "rejected"):
            to_example({"messages": [*row["messages"], row[side]]}, "messages")


def test_pairs_per_prompt_are_capped_and_keys_select_ratings(tmp_path):
    store = FeedbackStore(str(tmp_path / "fb"))
    for n in range(1, 4):
        _rate(store, _capture(store, n, "Where is my parcel?", f"good {n}"), 1, key="team-a")
    for n in range(4, 7):
        _rate(store, _capture(store, n, "Where is my parcel?", f"bad {n}"), -1, key="team-a" if n < 6 else "team-b")
    capped = export_pairs(store, str(tmp_path / "capped.jsonl"), max_pairs_per_prompt=4)
    assert [(c, r) for _, c, r in _pairs(capped.path)] == [
        ("good 1", "bad 4"), ("good 1", "bad 5"), ("good 1", "bad 6"), ("good 2", "bad 4")
    ]  # fmt: skip
    assert capped.skipped == {"over_pair_cap": 5}
    team_a = export_pairs(store, str(tmp_path / "a.jsonl"), keys={"team-a"})
    assert team_a.pairs == 6 and team_a.skipped == {"key_not_selected": 1}  # "bad 6" was rated by team-b only
    assert all(r != "bad 6" for _, _, r in _pairs(team_a.path))


def test_feedback_export_pairs_cli(tmp_path, capsys):
    store = FeedbackStore(str(tmp_path / "out" / "feedback"))  # the default: <output_dir>/feedback
    _rate(store, _capture(store, 1, "Where is my parcel?", "No idea."), -1, "Use the tracking link.")
    _rate(store, _capture(store, 2, "Opening hours?", "9 to 5."), 1)
    assert main(["feedback", "export", "--pairs", f"output_dir={tmp_path / 'out'}"]) == 0
    written = tmp_path / "out" / "feedback-pairs.jsonl"
    assert _pairs(str(written)) == [("Where is my parcel?", "Use the tracking link.", "No idea.")]
    out = capsys.readouterr().out
    assert f"1 preference pairs (1 corrected, 0 from ratings) -> {written}; left out: single_rating=1" in out
    assert (
        f"preference-tune on it: aigc preprocess --config ... data.path={written} data.format=messages "
        "data.preference=true, then aigc train ... train.preference.method=dpo"
    ) in out

"""Feedback with provenance, without a cluster: who rated (the API key's name, never the key), one rating per
(key, completion), only the key that made a completion may rate it, per-key limits (429 + Retry-After),
corrections through the content policy at export, export by key, retention and deletion on demand.

The same promises through a running Serve app with API keys are in ``test_feedback.py``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from aigc.feedback import FeedbackRequest, FeedbackStore, NotCompletionOwnerError, export_dataset
from aigc.feedback.retention import DAY_S, apply_retention
from aigc.serve.api_errors import ApiError, RateLimitedError
from aigc.serve.feedback import FeedbackCapture, FeedbackLimiter
from aigc.serve.moderation import RulePolicy

NOW = 1_800_000_000.0  # a fixed "now" for retention (seconds since the epoch)


def _cid(n: int) -> str:
    return f"chatcmpl-{n:032x}"


def _completion(n: int, key: str | None, created: float = NOW, answer: str = "It ships today.") -> dict:
    messages = [{"role": "user", "content": f"question {n}"}]
    return {"id": _cid(n), "object": "chat.completion", "created": int(created), "model": "m", "key_name": key,
            "messages": messages, "answer": answer}  # fmt: skip


def _rate(store: FeedbackStore, n: int, rating: int, key: str | None, correction: str | None = None,
          owner_only: bool = False):  # fmt: skip
    return store.add_feedback(FeedbackRequest(id=_cid(n), rating=rating, correction=correction), key, owner_only)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _answers(path: str) -> list[str]:
    return [json.loads(line)["messages"][-1]["content"] for line in Path(path).read_text().splitlines()]


# ================================================================================= attribution, replacement
def test_a_rating_records_the_key_name_and_a_later_one_replaces_it(tmp_path):
    root = tmp_path / "fb"
    store = FeedbackStore(str(root))
    store.capture(_completion(1, "team-a"))
    first = _rate(store, 1, 1, "team-a")
    assert first.key_name == "team-a"
    path = root / "ratings" / _cid(1) / "key-team-a.json"
    assert json.loads(path.read_text()) == {**first.to_json(), "key_name": "team-a"}

    second = _rate(store, 1, -1, "team-a", correction="Use the tracking link.")
    assert _files(root / "ratings") == [f"{_cid(1)}/key-team-a.json"]  # replaced, not added
    assert json.loads(path.read_text()) == second.to_json()
    assert store.ratings() == [second]

    # With feedback_from: any, another key's rating is kept beside it; the export takes the latest of them.
    third = _rate(store, 1, 1, "team/b")
    assert _files(root / "ratings") == [f"{_cid(1)}/key-team%2Fb.json", f"{_cid(1)}/key-team-a.json"]
    assert [r.key_name for r in store.ratings()] == ["team-a", "team/b"]
    assert third.created_ns > second.created_ns
    res = export_dataset(store, str(tmp_path / "all.jsonl"))
    assert (res.rows, res.corrected) == (1, 0) and _answers(res.path) == ["It ships today."]


def test_concurrent_posts_from_one_key_leave_one_whole_rating(tmp_path):
    root = tmp_path / "fb"
    store = FeedbackStore(str(root))
    store.capture(_completion(1, "team-a"))
    start = threading.Barrier(8)

    def post(i: int):
        if i < 8:
            start.wait()  # the first eight start together
        return _rate(store, 1, i % 3 - 1, "team-a", correction=f"answer number {i}" * 50)

    with ThreadPoolExecutor(8) as pool:
        posted = list(pool.map(post, range(32)))
    assert _files(root / "ratings") == [f"{_cid(1)}/key-team-a.json"]  # no second record, no temporary file
    stored = json.loads((root / "ratings" / _cid(1) / "key-team-a.json").read_text())
    assert stored in [r.to_json() for r in posted]  # one post's record, whole
    assert [r.to_json() for r in store.ratings()] == [stored]


# ===================================================================================== only the owner rates
def test_only_the_key_that_made_a_completion_may_rate_it(tmp_path):
    root = tmp_path / "fb"
    store = FeedbackStore(str(root))
    store.capture(_completion(1, "team-a"))
    store.capture(_completion(2, None))  # captured by a server without keys
    legacy = _completion(3, None)
    del legacy["key_name"]  # captured before completions recorded their key
    store.capture(legacy)

    for n, key in ((1, "team-b"), (1, None), (2, "team-a"), (3, "team-a")):
        with pytest.raises(NotCompletionOwnerError) as err:
            _rate(store, n, 1, key, owner_only=True)
        assert err.value.message == (
            f"the completion '{_cid(n)}' was made with another API key: only the key that made a request may rate "
            "or correct its answer (serve.feedback_from: owner)"
        )
        assert err.value.param == "id"
    assert not (root / "ratings").exists()  # nothing written by a refused post
    assert _rate(store, 1, 1, "team-a", owner_only=True).key_name == "team-a"
    assert _rate(store, 2, 1, None, owner_only=True).key_name is None  # no keys anywhere: the server's own

    # In the replica: the refusal is a 403 in OpenAI's shape.
    capture = FeedbackCapture(str(root), owner_only=True)
    with pytest.raises(ApiError) as api:
        asyncio.run(capture.submit(FeedbackRequest(id=_cid(1), rating=-1), "team-b"))
    assert (api.value.status, api.value.code, api.value.param, api.value.type) == (
        403, "not_completion_owner", "id", "invalid_request_error")  # fmt: skip
    assert store.ratings()[0].rating == 1  # team-a's rating untouched


# =========================================================================================== per-key limits
def test_feedback_limit_per_key_answers_429_with_retry_after():
    now = [100.0]
    limiter = FeedbackLimiter(3, clock=lambda: now[0])
    for t in (100.0, 110.0, 120.0):
        now[0] = t
        limiter.admit("team-a")
    now[0] = 130.0
    with pytest.raises(RateLimitedError) as err:
        limiter.admit("team-a")
    assert err.value.retry_after_s == 30  # the post at 100 leaves the window at 160
    assert err.value.message == ("Rate limit reached for feedback from API key 'team-a': 3 per minute "
                                 "(serve.feedback_per_key_per_minute). Please try again in 30s.")  # fmt: skip
    resp = err.value.response()
    assert resp.status_code == 429 and resp.headers["retry-after"] == "30"
    assert json.loads(resp.body) == {"error": {"message": err.value.message, "type": "requests", "param": None,
                                               "code": "rate_limit_exceeded"}}  # fmt: skip
    limiter.admit("team-b")  # another key has its own window
    limiter.admit(None)
    now[0] = 159.5
    with pytest.raises(RateLimitedError) as err:  # a refused post is not counted, and the wait rounds up
        limiter.admit("team-a")
    assert err.value.retry_after_s == 1
    now[0] = 160.0
    limiter.admit("team-a")  # the first post has left the window: exactly one more fits
    with pytest.raises(RateLimitedError):
        limiter.admit("team-a")
    unlimited = FeedbackLimiter(None)
    for _ in range(1000):
        unlimited.admit("team-a")


def test_every_feedback_post_counts_toward_the_limit_and_refused_ones_write_nothing(tmp_path):
    root = tmp_path / "fb"
    FeedbackStore(str(root)).capture(_completion(1, "team-a"))
    capture = FeedbackCapture(str(root), per_key_per_minute=2)

    async def posts() -> list[int]:
        statuses = []
        for cid in (_cid(99), _cid(98), _cid(1)):  # two unknown ids (404), then a valid post
            try:
                await capture.submit(FeedbackRequest(id=cid, rating=1), "team-a")
                statuses.append(200)
            except ApiError as exc:
                statuses.append(exc.status)
        return statuses

    assert asyncio.run(posts()) == [404, 404, 429]  # probing ids is not free
    assert not (root / "ratings").exists()


# ================================================================================== export: policy and keys
def test_export_checks_corrections_against_the_content_policy(tmp_path):
    store = FeedbackStore(str(tmp_path / "fb"))
    corrections = {1: "Your card 4111111111111111 is on file.", 2: "Use the tracking link.", 3: None}
    for n, correction in corrections.items():
        store.capture(_completion(n, "team-a", created=NOW + n))
        _rate(store, n, 1 if correction is None else -1, "team-a", correction=correction)
    policy = RulePolicy({"pii": [r"\b\d{16}\b"], "abuse": ["idiot"]})
    res = export_dataset(store, str(tmp_path / "out.jsonl"), policy=policy)
    assert _answers(res.path) == ["Use the tracking link.", "It ships today."]
    assert (res.rows, res.corrected, res.skipped) == (2, 1, {"correction_flagged:pii": 1})
    assert export_dataset(store, str(tmp_path / "unchecked.jsonl")).rows == 3  # no policy: no check


def test_export_keeps_only_ratings_from_named_keys(tmp_path):
    store = FeedbackStore(str(tmp_path / "fb"))
    for n, key in enumerate(("team-a", "team-b", None, "team-a"), start=1):
        store.capture(_completion(n, key, created=NOW + n, answer=f"answer {n}"))
        _rate(store, n, 1, key)
    _rate(store, 4, -1, "team-b", correction="team-b's correction")  # a later rating by another key
    res = export_dataset(store, str(tmp_path / "a.jsonl"), keys={"team-a"})
    assert _answers(res.path) == ["answer 1", "answer 4"]  # team-b's later correction of 4 does not count
    assert (res.rows, res.skipped) == (2, {"key_not_selected": 2})  # 2 (team-b) and 3 (no key)
    res = export_dataset(store, str(tmp_path / "ab.jsonl"), keys={"team-a", "team-b"})
    assert _answers(res.path) == ["answer 1", "answer 2", "team-b's correction"]
    assert (res.rows, res.corrected, res.skipped) == (3, 1, {"key_not_selected": 1})


def test_feedback_export_cli_loads_the_policy_and_filters_keys(tmp_path, capsys):
    from aigc.cli import main

    out = tmp_path / "out"
    store = FeedbackStore(str(out / "feedback"))
    for n, (key, correction) in enumerate((("ci", "You idiot, it shipped."), ("ci", "It shipped."),
                                           ("web", "From the web key.")), start=1):  # fmt: skip
        store.capture(_completion(n, key, created=time.time() + n))
        _rate(store, n, -1, key, correction=correction)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"output_dir": str(out), "serve": {"moderation": {"categories": {
        "abuse": ["idiot"]}}}}))  # fmt: skip
    assert main(["feedback", "export", "--config", str(cfg), "--keys", "ci, ,other"]) == 0
    written = out / "feedback-export.jsonl"
    assert _answers(str(written)) == ["It shipped."]
    assert (f"1 rows (1 corrected) -> {written}; left out: correction_flagged:abuse=1, key_not_selected=1"
            in capsys.readouterr().out)  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(["feedback", "export", "--config", str(cfg), "--keys", ","])
    assert exit_.value.code == 2
    assert "argument --keys: name at least one API key, e.g. --keys team-a,team-b" in capsys.readouterr().err


# ================================================================================ retention, delete on demand
def _store_with_ages(root: Path) -> FeedbackStore:
    """Completion 1 is 10 days old (rated by its key and by another), 2 is 1 day old (rated), 3 is 10 days
    old and never rated; a rating whose completion is already gone is left behind as an orphan."""
    store = FeedbackStore(str(root))
    store.capture(_completion(1, "ci", created=NOW - 10 * DAY_S))
    store.capture(_completion(2, "web", created=NOW - DAY_S))
    store.capture(_completion(3, "ci", created=NOW - 10 * DAY_S))
    store.capture(_completion(4, "web", created=NOW))
    _rate(store, 1, 1, "ci")
    _rate(store, 1, -1, "web")
    _rate(store, 2, 1, "web")
    _rate(store, 2, 0, "ci")
    _rate(store, 4, 1, "web")
    (root / "completions" / f"{_cid(4)}.json").unlink()  # 4's rating is an orphan now
    return store


def test_retention_deletes_old_captures_and_their_feedback(tmp_path, capsys):
    root = tmp_path / "fb"
    store = _store_with_ages(root)
    assert apply_retention(store, None, NOW).completions == 0  # no retention: nothing goes
    removed = apply_retention(store, 7, NOW)
    assert (removed.completions, removed.ratings) == (2, 3)  # 1 and 3; 1's two ratings and 4's orphan
    assert _files(root) == [f"completions/{_cid(2)}.json", f"ratings/{_cid(2)}/key-ci.json",
                            f"ratings/{_cid(2)}/key-web.json"]  # fmt: skip
    assert "[feedback] retention (serve.capture_retention_days=7): removed 2 completions and 3 ratings" in (
        capsys.readouterr().out)  # fmt: skip
    assert apply_retention(store, 7, NOW).completions == 0  # nothing left to remove; no error


def test_replica_sweeps_expired_captures_on_a_schedule(tmp_path, monkeypatch):
    import aigc.feedback.retention as retention

    root = tmp_path / "fb"
    _store_with_ages(root)
    monkeypatch.setattr(retention.time, "time", lambda: NOW)
    capture = FeedbackCapture(str(root), retention_days=7)
    sweeps = []
    real = capture.store.delete_before

    def counted(cutoff_s: float):
        sweeps.append(cutoff_s)
        return real(cutoff_s)

    capture.store.delete_before = counted

    async def run_a_while() -> None:
        task = asyncio.create_task(capture.keep_sweeping(every_s=0.05))
        deadline = time.monotonic() + 10
        while len(sweeps) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(run_a_while())
    assert sweeps[:2] == [NOW - 7 * DAY_S] * 2  # at start, then again
    assert not (root / "completions" / f"{_cid(1)}.json").exists()
    assert not (root / "ratings" / _cid(1)).exists()
    assert (root / "ratings" / _cid(2) / "key-web.json").exists()
    # Without retention the loop returns at once.
    asyncio.run(asyncio.wait_for(FeedbackCapture(str(root)).keep_sweeping(every_s=0), 1))


def test_export_applies_retention_first(tmp_path, capsys, monkeypatch):
    import aigc.feedback.retention as retention
    from aigc.config import load_config
    from aigc.feedback import export_feedback

    out = tmp_path / "out"
    _store_with_ages(out / "feedback")
    monkeypatch.setattr(retention.time, "time", lambda: NOW)
    cfg = load_config(None, [f"output_dir={out}", "serve.capture_retention_days=7"])
    res = export_feedback(cfg, min_rating=0, policy=None)
    assert _answers(res.path) == ["It ships today."]  # 2 only: 1 expired, 4's completion is gone
    assert not (out / "feedback" / "completions" / f"{_cid(1)}.json").exists()
    assert "removed 2 completions and 3 ratings" in capsys.readouterr().out


def test_feedback_delete_by_date_and_by_key(tmp_path, capsys):
    from aigc.cli import main

    out = tmp_path / "out"
    root = out / "feedback"
    _store_with_ages(root)
    before = datetime.fromtimestamp(NOW - 5 * DAY_S, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert main(["feedback", "delete", "--before", before, f"output_dir={out}"]) == 0
    assert capsys.readouterr().out == (f"[feedback] removed 2 completions and 3 ratings captured before "
                                       f"{before}+00:00 from {root}\n")  # fmt: skip
    assert _files(root) == [f"completions/{_cid(2)}.json", f"ratings/{_cid(2)}/key-ci.json",
                            f"ratings/{_cid(2)}/key-web.json"]  # fmt: skip

    _rate(FeedbackStore(str(root)), 2, 1, None)  # one more rating, from no key
    assert main(["feedback", "delete", "--key", "ci", f"output_dir={out}"]) == 0
    assert capsys.readouterr().out == f"[feedback] removed 0 completions and 1 ratings of API key 'ci' from {root}\n"
    assert _files(root) == [f"completions/{_cid(2)}.json", f"ratings/{_cid(2)}/anonymous.json",
                            f"ratings/{_cid(2)}/key-web.json"]  # fmt: skip
    assert main(["feedback", "delete", "--key", "web", f"output_dir={out}"]) == 0  # its completion, all ratings
    assert "removed 1 completions and 2 ratings of API key 'web'" in capsys.readouterr().out
    assert _files(root) == []

    for argv, message in (
        (["--before", "yesterday"], "argument --before: not a date: 'yesterday' (e.g. 2026-11-01 or 2026-11-01T12:00)"),
        (["--before", "2026-01-01", "--key", "ci"], "argument --key: not allowed with argument --before"),
        ([], "one of the arguments --before --key is required"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["feedback", "delete", *argv, f"output_dir={out}"])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    assert main(["feedback", "delete", "--key", "ci", f"output_dir={tmp_path / 'nothing'}"]) == 1
    assert "no feedback store at" in capsys.readouterr().err


def test_delete_on_s3(s3_server):
    root = s3_server("feedback")
    store = FeedbackStore(root)
    store.capture(_completion(1, "ci", created=NOW - 10 * DAY_S))
    store.capture(_completion(2, "web", created=NOW))
    _rate(store, 1, 1, "ci")
    _rate(store, 2, 1, "web")
    _rate(store, 2, 1, "ci")
    removed = store.delete_before(NOW - 7 * DAY_S)
    assert (removed.completions, removed.ratings) == (1, 1)
    assert [(r.completion_id, r.key_name) for r in store.ratings()] == [(_cid(2), "ci"), (_cid(2), "web")]
    removed = store.delete_key("ci")
    assert (removed.completions, removed.ratings) == (0, 1)
    assert [(r.completion_id, r.key_name) for r in store.ratings()] == [(_cid(2), "web")]
    assert store.completion(_cid(1)) is None and store.completion(_cid(2)) is not None

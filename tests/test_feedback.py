"""The feedback loop: capture answers, take ratings and corrections, export a dataset that preprocess accepts.

First the store and the export on their own (local and ``s3://``), then a Serve app with ``serve.capture`` on,
through the official ``openai`` client and raw HTTP.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pandas as pd
import pytest
import yaml
from helpers import free_port

from aigc import storage
from aigc.config import PlatformConfig, load_config
from aigc.errors import ConfigError, StorageError
from aigc.feedback import FeedbackRequest, FeedbackStore, UnknownCompletionError, export_dataset
from aigc.feedback.store import MAX_CORRECTION_CHARS
from aigc.serve.engine import SamplingParams
from aigc.serve.feedback import FeedbackCapture

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "assets" / "tiny-base")
TIMEOUT_S = 60
HEX = "0123456789abcdef" * 2


def _cid(n: int, prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{n:032x}"


def _completion(cid: str, user: str = "Where is my parcel?", answer: str = "It ships today.", created: int = 0,
                key: str | None = None) -> dict:  # fmt: skip
    if cid.startswith("cmpl-"):
        return {"id": cid, "object": "text_completion", "created": created, "model": "m", "key_name": key,
                "prompt": user, "answer": answer}  # fmt: skip
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}]
    return {"id": cid, "object": "chat.completion", "created": created, "model": "m", "key_name": key,
            "messages": messages, "answer": answer}  # fmt: skip


def _rate(store: FeedbackStore, cid: str, rating: int, correction: str | None = None, key: str | None = None,
          owner_only: bool = False):  # fmt: skip
    return store.add_feedback(FeedbackRequest(id=cid, rating=rating, correction=correction), key, owner_only)


# ====================================================================================== the store on its own
def test_records_are_whole_objects_and_a_torn_write_leaves_nothing(tmp_path, monkeypatch):
    store = FeedbackStore(str(tmp_path / "fb"))
    cid = _cid(1)
    path = store.capture(_completion(cid))
    assert path == str(tmp_path / "fb" / "completions" / f"{cid}.json")
    assert json.loads(Path(path).read_text()) == _completion(cid)

    first = _rate(store, cid, 1)
    [written] = (tmp_path / "fb" / "ratings" / cid).iterdir()
    assert written.name == "anonymous.json"  # a server without keys: one rating per completion
    assert json.loads(written.read_text()) == first.to_json()

    # The writer of a replacement dies between writing its temporary file and renaming it into place: the
    # first rating stays as it was.
    def die(*_):
        raise OSError("killed mid-write")

    monkeypatch.setattr(storage.files.os, "replace", die)
    with pytest.raises(StorageError, match="killed mid-write"):
        _rate(store, cid, -1, correction="A better answer.")
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "fb" / "ratings" / cid).iterdir())
    assert names == [written.name]  # the failed write removed its temporary file
    assert json.loads(written.read_text()) == first.to_json()
    assert store.ratings() == [first]


def test_unknown_id_is_refused_and_nothing_is_written(tmp_path):
    store = FeedbackStore(str(tmp_path / "fb"))
    store.capture(_completion(_cid(1)))
    for bad in (_cid(2), "chatcmpl-../completions/x", "cmpl-" + HEX.upper(), ""):
        with pytest.raises(UnknownCompletionError) as err:
            _rate(store, bad, 1)
        assert err.value.message == f"no completion with id '{bad}' was captured on this server"
        assert err.value.param == "id"
    assert not (tmp_path / "fb" / "ratings").exists()
    with pytest.raises(ValueError, match="not a completion id"):
        store.capture(_completion("chatcmpl-x/../../escape"))


def test_unwritable_store_raises_storage_error(tmp_path, caplog):
    import asyncio

    root = tmp_path / "fb"
    store = FeedbackStore(str(root))
    store.capture(_completion(_cid(1)))
    (root / "ratings").write_text("a file where the ratings directory should be")
    with pytest.raises(StorageError, match="feedback store: cannot access"):
        _rate(store, _cid(1), 1)
    (root / "completions" / f"{_cid(1)}.json").unlink()
    (root / "completions").rmdir()
    (root / "completions").write_text("not a directory")
    with pytest.raises(StorageError):
        store.capture(_completion(_cid(2)))

    # In the ingress a failed capture is logged without the conversation, and reported as False.
    capture = FeedbackCapture(str(root))
    secret = "my card number is 4111"
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        ok = asyncio.run(capture.capture(_cid(3), "m", [{"role": "user", "content": secret}],
                                         SamplingParams(), "an answer " + secret, "stop"))  # fmt: skip
    assert ok is False
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"capture of {_cid(3)} failed"]
    assert secret not in caplog.text


def test_export_keeps_good_and_corrected_answers(tmp_path):
    store = FeedbackStore(str(tmp_path / "fb"))
    cases = {  # n -> (ratings in order, optional correction of the last)
        1: ([1], None),  # good answer: kept as served
        2: ([-1], "Use the tracking link."),  # bad answer, corrected: kept with the correction
        3: ([-1], None),  # bad answer: left out
        4: ([0], None),  # neutral: left out at min_rating 1, kept at 0
        5: ([1, -1], None),  # re-rated: the latest (-1) wins
        6: ([], None),  # captured, never rated: not even counted
    }
    for n, (ratings, correction) in cases.items():
        store.capture(_completion(_cid(n), user=f"question {n}", answer=f"answer {n}", created=100 - n))
        for i, r in enumerate(ratings):
            _rate(store, _cid(n), r, correction if i == len(ratings) - 1 else None)
    store.capture(_completion(_cid(7, "cmpl"), answer="text"))
    _rate(store, _cid(7, "cmpl"), 1)
    no_user = {**_completion(_cid(8)), "messages": [{"role": "system", "content": "Be brief."}]}
    store.capture(no_user)
    _rate(store, _cid(8), 1)
    store.capture(_completion(_cid(9)))
    _rate(store, _cid(9), 1)
    (tmp_path / "fb" / "completions" / f"{_cid(9)}.json").unlink()  # rated, then removed by retention

    out = str(tmp_path / "export" / "data.jsonl")
    res = export_dataset(store, out, min_rating=1)
    rows = [json.loads(line) for line in Path(out).read_text().splitlines()]

    def row(n: int, answer: str) -> dict:
        return {"messages": [*_completion(_cid(n))["messages"][:1], {"role": "user", "content": f"question {n}"},
                             {"role": "assistant", "content": answer}]}  # fmt: skip

    assert rows == [row(2, "Use the tracking link."), row(1, "answer 1")]  # ordered by capture time
    assert (res.path, res.rows, res.corrected) == (out, 2, 1)
    assert res.skipped == {"below_min_rating": 3, "completion_missing": 1, "no_user_turn": 1, "text_completion": 1}

    res0 = export_dataset(store, out, min_rating=0)
    assert res0.rows == 3 and json.loads(Path(out).read_text().splitlines()[0]) == row(4, "answer 4")
    assert res0.skipped == {"below_min_rating": 2, "completion_missing": 1, "no_user_turn": 1, "text_completion": 1}


def test_feedback_export_cli(tmp_path, capsys):
    from aigc.cli import main

    store = FeedbackStore(str(tmp_path / "out" / "feedback"))  # the default: <output_dir>/feedback
    store.capture(_completion(_cid(1)))
    _rate(store, _cid(1), -1, correction="Right answer.")
    assert main(["feedback", "export", f"output_dir={tmp_path / 'out'}"]) == 0
    written = tmp_path / "out" / "feedback-export.jsonl"
    assert json.loads(written.read_text())["messages"][-1] == {"role": "assistant", "content": "Right answer."}
    assert f"1 rows (1 corrected) -> {written}; left out: none" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["feedback", "export", "--min-rating", "5"])
    assert exit_.value.code == 2
    assert "argument --min-rating: invalid choice: 5" in capsys.readouterr().err
    assert main(["feedback", "export", f"output_dir={tmp_path / 'elsewhere'}"]) == 1
    msg = f"aigc feedback: no feedback store at {tmp_path / 'elsewhere' / 'feedback'}: serve with serve.capture=true"
    assert capsys.readouterr().err.startswith(msg)
    assert not (tmp_path / "elsewhere").exists()


def test_feedback_config_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["serve.capture=true", "serve.feedback_dir=fb"])
    assert cfg.serve.capture is True and cfg.serve.feedback_dir == str(tmp_path / "fb")
    assert load_config(None, []).serve.capture is False
    with pytest.raises(ConfigError, match="serve.feedback_dir: String should have at least 1 character"):
        load_config(None, ["serve.feedback_dir="])


def test_store_and_export_on_s3(s3_server):
    root = s3_server("feedback")
    store = FeedbackStore(root)
    store.capture(_completion(_cid(1), answer="first"))
    store.capture(_completion(_cid(2), answer="second"))
    _rate(store, _cid(1), 1)
    _rate(store, _cid(2), 1)
    _rate(store, _cid(2), -1, correction="corrected")  # the latest wins
    with pytest.raises(UnknownCompletionError):
        _rate(store, _cid(3), 1)
    assert storage.list_dirs(storage.join(root, "ratings")) == [_cid(1), _cid(2)]
    out = storage.join(root, "export.jsonl")
    assert export_dataset(store, out).rows == 2
    answers = [json.loads(line)["messages"][-1]["content"] for line in storage.read_text(out).splitlines()]
    assert sorted(answers) == ["corrected", "first"]


# ============================================================================ through a Serve app with capture
@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from openai import OpenAI
    from ray import serve

    from aigc.serve.run import run_server

    tmp = tmp_path_factory.mktemp("feedback")
    serve.shutdown()  # Serve's port is fixed when it starts: begin from a clean slate
    keys_file = tmp / "keys.yaml"
    keys_file.write_text(yaml.safe_dump(KEYS))
    # One ingress replica: the feedback limit is counted per replica, and this module checks it exactly.
    cfg = PlatformConfig.model_validate({
        "output_dir": str(tmp / "out"),
        "registry_dir": str(tmp / "registry"),
        "model": {"name_or_path": TINY},
        "serve": {"port": free_port(), "app_name": "aigc-feedback", "max_tokens_cap": 32, "default_max_tokens": 8,
                  "cpus_per_replica": 1, "autoscaling": {"min_replicas": 1, "max_replicas": 1}, "capture": True,
                  "ingress_replicas": 1, "api_keys_file": str(keys_file),
                  "feedback_per_key_per_minute": FEEDBACK_PER_MINUTE},
    })  # fmt: skip
    url = run_server(cfg, blocking=False)
    clients = []

    def as_key(name: str) -> SimpleNamespace:
        """The openai client and a raw HTTP client that send ``name``'s key."""
        http = httpx.Client(base_url=url, timeout=TIMEOUT_S, headers={"Authorization": f"Bearer {KEYS[name]}"})
        clients.append(http)
        return SimpleNamespace(client=OpenAI(base_url=url, api_key=KEYS[name], timeout=TIMEOUT_S, max_retries=0),
                               http=http)  # fmt: skip

    alice = as_key("alice")  # the tests that do not care about keys use alice's
    yield SimpleNamespace(
        cfg=cfg,
        tmp=tmp,
        dir=tmp / "out" / "feedback",
        client=alice.client,
        http=alice.http,
        as_key=as_key,
        base_id="tiny-base",
    )
    for http in clients:
        http.close()
    serve.shutdown()


KEYS = {name: f"{name}-secret-{'x' * 16}" for name in ("alice", "bob", "erin")}
FEEDBACK_PER_MINUTE = 20


MARKER = "zebra-7731 parcel"  # in prompts only: must never reach a log


def _ratings(server) -> list[str]:
    return sorted(str(p.relative_to(server.dir)) for p in (server.dir / "ratings").rglob("*") if p.is_file())


def _wait_for_logs(*expected: str) -> str:
    """The text of every serve log file once each ``expected`` line is there (they are flushed asynchronously)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    deadline = time.monotonic() + 20
    while True:
        text = "".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file() and "serve" in str(p))
        if all(e in text for e in expected) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(e in text for e in expected), [e for e in expected if e not in text]
    return text


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def test_capture_feedback_export_preprocess_round_trip(server):
    from transformers import AutoTokenizer

    from aigc.data.preprocess import preprocess
    from aigc.feedback import export_feedback

    messages = [{"role": "user", "content": f"Where is my {MARKER}?"}]
    r = server.client.chat.completions.create(model=server.base_id, messages=messages, max_tokens=8, temperature=0)
    assert r.id.startswith("chatcmpl-")
    captured = json.loads((server.dir / "completions" / f"{r.id}.json").read_text())
    assert {k: captured[k] for k in ("id", "object", "model", "key_name", "messages", "answer", "finish_reason")} == {
        "id": r.id, "object": "chat.completion", "model": server.base_id, "key_name": "alice", "messages": messages,
        "answer": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason,
    }  # fmt: skip
    assert captured["params"] == {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None,
                                  "stop": [], "logprobs": None, "n": 1, "response_format": None}  # fmt: skip

    chunks = list(server.client.chat.completions.create(model=server.base_id, messages=messages, max_tokens=8,
                                                        temperature=0, stream=True))  # fmt: skip
    sid = chunks[0].id
    assert sid.startswith("chatcmpl-") and sid != r.id and all(c.id == sid for c in chunks)
    streamed = json.loads((server.dir / "completions" / f"{sid}.json").read_text())
    assert streamed["answer"] == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed["answer"] == r.choices[0].message.content  # greedy: the same text
    assert streamed["key_name"] == "alice"

    # n choices: the first is the one captured (streamed or not)
    many = dict(model=server.base_id, messages=messages, max_tokens=8, temperature=1.0, seed=3, n=3)
    r3 = server.client.chat.completions.create(**many)
    c3 = json.loads((server.dir / "completions" / f"{r3.id}.json").read_text())
    assert (c3["answer"], c3["params"]["n"]) == (r3.choices[0].message.content, 3)
    s3 = list(server.client.chat.completions.create(**many, stream=True))
    first = "".join(ch.delta.content or "" for c in s3 for ch in c.choices if ch.index == 0)
    assert json.loads((server.dir / "completions" / f"{s3[0].id}.json").read_text())["answer"] == first
    assert first == r3.choices[0].message.content  # the same seed: the same choices

    t = server.client.completions.create(model=server.base_id, prompt=f"The {MARKER}", max_tokens=4, temperature=0)
    assert t.id.startswith("cmpl-")
    assert json.loads((server.dir / "completions" / f"{t.id}.json").read_text())["prompt"] == f"The {MARKER}"

    # Feedback through the openai SDK's generic POST, as the README shows it.
    correction = "Your parcel is at the depot and arrives tomorrow."
    fb = server.client.post("/feedback", cast_to=object, body={"id": r.id, "rating": -1, "correction": correction,
                                                               "comment": "wrong"})  # fmt: skip
    assert {k: fb[k] for k in ("object", "completion_id", "rating", "correction", "comment", "key_name")} == {
        "object": "feedback", "completion_id": r.id, "rating": -1, "correction": correction, "comment": "wrong",
        "key_name": "alice",
    }  # fmt: skip
    assert fb["id"].startswith("fb-")
    assert server.http.post("/feedback", json={"id": sid, "rating": 1}).status_code == 200
    assert server.http.post("/feedback", json={"id": t.id, "rating": 1}).status_code == 200
    assert len(_ratings(server)) == 3

    out = str(server.tmp / "export.jsonl")
    res = export_feedback(server.cfg, min_rating=1, output=out, policy=None)
    assert (res.rows, res.corrected, res.skipped) == (2, 1, {"text_completion": 1})
    rows = [json.loads(line) for line in Path(out).read_text().splitlines()]
    assert sorted(row["messages"][-1]["content"] for row in rows) == sorted([correction, streamed["answer"]])
    assert all(row["messages"][:-1] == messages for row in rows)

    # `aigc preprocess` takes the file as it is.
    overrides = [f"data.path={out}", "data.format=messages", f"model.name_or_path={TINY}",
                 f"output_dir={server.tmp / 'pre'}", "data.val_fraction=0", "data.tokenizer_actors=1"]  # fmt: skip
    cfg = load_config(None, overrides)
    pre = preprocess(cfg.data, cfg.model, cfg.output_dir)
    stats = pre.stats
    assert (stats["rows_in"], stats["rows_kept"], stats["rows_train"]) == (2, 2, 2)
    tok = AutoTokenizer.from_pretrained(TINY)
    train = pd.read_parquet(Path(pre.shards_dir) / "train")
    targets = [tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
               for ids, labels in zip(train["input_ids"], train["labels"], strict=True)]  # fmt: skip
    assert any(correction in target for target in targets)


def test_bad_feedback_gets_openai_errors_and_appends_nothing(server):
    r = server.client.chat.completions.create(
        model=server.base_id, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    before = _ratings(server)
    post = server.http.post
    never_issued = _cid(12345)
    err = _error(post("/feedback", json={"id": never_issued, "rating": 1}), 404)
    assert err == {"message": f"no completion with id '{never_issued}' was captured on this server",
                   "type": "invalid_request_error", "param": "id", "code": "completion_not_found"}  # fmt: skip
    assert _error(post("/feedback", json={"id": "chatcmpl-../../etc", "rating": 1}), 404)["param"] == "id"

    ok = {"id": r.id, "rating": 1}
    cases = [
        ({**ok, "rating": 2}, "rating", "rating: Input should be less than or equal to 1"),
        ({**ok, "rating": -2}, "rating", "rating: Input should be greater than or equal to -1"),
        ({**ok, "rating": "1"}, "rating", "rating: Input should be a valid integer"),
        ({**ok, "rating": True}, "rating", "rating: Input should be a valid integer"),
        ({"id": r.id}, "rating", "rating: Field required"),
        ({"rating": 1}, "id", "id: Field required"),
        ({**ok, "stars": 5}, "stars", "stars: Extra inputs are not permitted"),
        ({**ok, "correction": "x" * (MAX_CORRECTION_CHARS + 1)}, "correction",
         f"correction: String should have at most {MAX_CORRECTION_CHARS} characters"),
        ({**ok, "correction": "  "}, "correction",
         "correction: must not be empty (leave it out to keep the answer)"),
        ({**ok, "comment": "c" * 2001}, "comment", "comment: String should have at most 2000 characters"),
    ]  # fmt: skip
    for body, param, message in cases:
        err = _error(post("/feedback", json=body), 400)
        assert (err["param"], err["message"], err["type"]) == (param, message, "invalid_request_error"), body
    assert _error(post("/feedback", content=b"{", headers={"content-type": "application/json"}), 400)["param"] is None
    assert _ratings(server) == before  # nothing appended by any refused request
    assert post("/feedback", json=ok).status_code == 200
    assert len(_ratings(server)) == len(before) + 1


def test_unwritable_store_fails_feedback_only(server):
    ratings, completions, aside = server.dir / "ratings", server.dir / "completions", server.tmp / "aside"
    hi = [{"role": "user", "content": "hi"}]
    r = server.client.chat.completions.create(model=server.base_id, messages=hi, max_tokens=4, temperature=0)
    aside.mkdir()
    for d in (ratings, completions):
        if d.exists():
            os.rename(d, aside / d.name)
    try:
        ratings.write_text("a file where the ratings directory should be")
        completions.mkdir()
        os.link(aside / "completions" / f"{r.id}.json", completions / f"{r.id}.json")  # r is still known
        resp = server.http.post("/feedback", json={"id": r.id, "rating": 1})
        err = _error(resp, 503)
        assert resp.headers["retry-after"] == "1"
        assert err == {"message": "the feedback store is unavailable; retry later", "type": "server_error",
                       "param": None, "code": "feedback_store_unavailable"}  # fmt: skip
        # Capture fails too (no completions directory to write in), and generation goes on, streamed and not.
        shutil.rmtree(completions)
        completions.write_text("not a directory")
        again = server.client.chat.completions.create(model=server.base_id, messages=hi, max_tokens=4, temperature=0)
        assert again.choices[0].message.content == r.choices[0].message.content
        chunks = server.client.chat.completions.create(model=server.base_id, messages=hi, max_tokens=4, temperature=0,
                                                       stream=True)  # fmt: skip
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == again.choices[0].message.content
        _wait_for_logs(f"capture of {again.id} failed (StorageError", "POST /v1/feedback 503")  # logged, by id
    finally:
        for d in (ratings, completions):
            if d.is_dir():
                shutil.rmtree(d)
            elif d.exists():
                d.unlink()
            if (aside / d.name).exists():
                os.rename(aside / d.name, d)
        aside.rmdir()
    assert server.http.post("/feedback", json={"id": r.id, "rating": 1}).status_code == 200
    assert not (completions / f"{again.id}.json").exists()  # what failed to be captured stays absent


def test_prompts_and_answers_never_reach_the_logs(server):
    """Every log line of the serve processes is searched for a prompt and a feedback comment: neither is there."""
    r = server.client.chat.completions.create(model=server.base_id, messages=[{"role": "user", "content": MARKER}],
                                              max_tokens=8, temperature=0)  # fmt: skip
    assert server.http.post("/feedback", json={"id": r.id, "rating": 1, "comment": MARKER}).status_code == 200
    text = _wait_for_logs("POST /v1/feedback 200")
    assert MARKER not in text  # neither the prompt nor the comment


def test_feedback_is_attributed_owned_and_limited_per_key(server):
    bob, erin = server.as_key("bob"), server.as_key("erin")
    hi = [{"role": "user", "content": "hi"}]
    r = bob.client.chat.completions.create(model=server.base_id, messages=hi, max_tokens=4, temperature=0)
    assert json.loads((server.dir / "completions" / f"{r.id}.json").read_text())["key_name"] == "bob"

    # Another key may not rate or correct it: 403, nothing written.
    err = _error(server.http.post("/feedback", json={"id": r.id, "rating": -1, "correction": "Poison."}), 403)
    assert err == {"message": f"the completion '{r.id}' was made with another API key: only the key that made a "
                              "request may rate or correct its answer (serve.feedback_from: owner)",
                   "type": "invalid_request_error", "param": "id", "code": "not_completion_owner"}  # fmt: skip
    assert not (server.dir / "ratings" / r.id).exists()

    # Its own key rates it twice: one record, the second, under the key's name; no key is stored anywhere.
    assert bob.http.post("/feedback", json={"id": r.id, "rating": 1}).status_code == 200
    second = bob.http.post("/feedback", json={"id": r.id, "rating": -1, "correction": "Hello!"}).json()
    assert [p.name for p in (server.dir / "ratings" / r.id).iterdir()] == ["key-bob.json"]
    assert json.loads((server.dir / "ratings" / r.id / "key-bob.json").read_text()) == second
    assert (second["key_name"], second["rating"], second["correction"]) == ("bob", -1, "Hello!")
    stored = "".join(p.read_text() for p in server.dir.rglob("*") if p.is_file())
    assert not [name for name, key in KEYS.items() if key in stored]

    # erin's posts count toward erin's limit only (unknown ids included); then 429 with Retry-After.
    before = _ratings(server)
    for _ in range(FEEDBACK_PER_MINUTE):
        assert erin.http.post("/feedback", json={"id": _cid(777), "rating": 1}).status_code == 404
    resp = erin.http.post("/feedback", json={"id": _cid(777), "rating": 1})
    err = _error(resp, 429)
    assert 1 <= int(resp.headers["retry-after"]) <= 60
    assert (err["type"], err["code"], err["param"]) == ("requests", "rate_limit_exceeded", None)
    limit = f"{FEEDBACK_PER_MINUTE} per minute (serve.feedback_per_key_per_minute)"
    assert err["message"].startswith(f"Rate limit reached for feedback from API key 'erin': {limit}. Please try again")
    assert bob.http.post("/feedback", json={"id": r.id, "rating": 0}).status_code == 200  # bob is not limited
    assert _ratings(server) == before


def test_a_split_alias_answers_by_weight_sticks_per_user_and_moves_under_load(server):
    """``aigc traffic``: each answer is named (and captured) by the version that wrote it, the same ``user`` gets
    the same version, ratings compare side by side, and moving the weights under load fails no request."""
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    from helpers import make_tiny_adapter

    from aigc.feedback.compare import compare_versions
    from aigc.registry import Registry

    reg = Registry(server.cfg.registry_dir)
    for seed in (4, 5):
        reg.register("canary", make_tiny_adapter(TINY, server.tmp / f"canary-{seed}", seed=seed), base_model=TINY)
    reg.set_traffic("canary", {1: 50, 2: 50})
    bob = server.as_key("bob")
    hi = [{"role": "user", "content": "Where is my parcel?"}]

    def ask(user: str | None = None):
        extra = {"user": user} if user else {}
        return bob.client.chat.completions.create(model="canary", messages=hi, max_tokens=4, temperature=0,
                                                    **extra)  # fmt: skip

    answers = [ask(f"user-{i}") for i in range(24)]
    split = Counter(a.model for a in answers)
    assert set(split) == {"canary:v1", "canary:v2"} and min(split.values()) >= 6, split
    for i, a in enumerate(answers[:4]):  # sticky per user
        assert {ask(f"user-{i}").model for _ in range(3)} == {a.model}
    for a in answers:  # captured under the version that answered
        assert json.loads((server.dir / "completions" / f"{a.id}.json").read_text())["model"] == a.model

    rated = answers[:6]
    for a in rated:  # v2's answers rated good, v1's bad
        rating = 1 if a.model == "canary:v2" else -1
        assert bob.http.post("/feedback", json={"id": a.id, "rating": rating}).status_code == 200
    rows = {v.model: (v.good, v.bad) for v in compare_versions(FeedbackStore(str(server.dir)), "canary")}
    expected = Counter(a.model for a in rated)
    assert rows == {m: (n, 0) if m == "canary:v2" else (0, n) for m, n in expected.items()}

    # All traffic to v2 while 4 callers keep asking: no request fails, and soon every answer is v2's.
    with ThreadPoolExecutor(4) as pool:
        pending = [pool.submit(ask) for _ in range(16)]
        reg.set_traffic("canary", {2: 100})
        pending += [pool.submit(ask) for _ in range(16)]
        models = [f.result(timeout=60).model for f in pending]  # the openai client raises on any error
    assert set(models) <= {"canary:v1", "canary:v2"}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and {ask(f"user-{i}").model for i in range(6)} != {"canary:v2"}:
        time.sleep(0.5)
    assert {ask(f"user-{i}").model for i in range(6)} == {"canary:v2"}


def test_capture_off_refuses_feedback():
    import asyncio

    from aigc.serve.api_errors import ApiError
    from aigc.serve.ingress import OpenAIIngress

    # The route itself, outside Serve, on an ingress built without a feedback_dir: it says so, naming the key.
    ingress = SimpleNamespace(_feedback=None)
    with pytest.raises(ApiError) as err:
        request = SimpleNamespace(state=SimpleNamespace(key_name="team-a"))
        asyncio.run(OpenAIIngress.func_or_class.feedback(ingress, FeedbackRequest(id=_cid(1), rating=1), request))
    assert (err.value.status, err.value.code, err.value.param) == (404, "feedback_disabled", None)
    assert err.value.message == "feedback is off on this server (serve.capture: false)"

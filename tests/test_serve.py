"""Serving: the OpenAI app on a local Ray Serve, through the official ``openai`` client and raw HTTP (the
engine on its own is ``tests/test_engine.py``).

One tiny random Llama and three LoRA adapters (two versions of ``support``, one ``other``) plus a
``broken`` registry entry whose weights are garbage. Random weights make meaningless text, but greedy
decoding is deterministic, so outputs can be compared: adapter vs base, v1 vs v2, streamed vs not.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
from helpers import free_port, make_tiny_adapter, make_tiny_model

from aigc.config import ModerationConfig, PlatformConfig, ServeConfig
from aigc.errors import InvalidRequestError
from aigc.registry import Registry

TIMEOUT_S = 60  # every HTTP request is bounded by this
MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Where is my parcel?"},
]
CAP = 64


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    base = make_tiny_model(tmp / "tiny-base")
    registry = Registry(str(tmp / "registry"))
    # Seeds picked so that greedy replies contain spaces: the streamer releases text a word at a time.
    v1 = make_tiny_adapter(base, tmp / "support-v1", seed=4)
    v2 = make_tiny_adapter(base, tmp / "support-v2", seed=5)
    other = make_tiny_adapter(base, tmp / "other", seed=3)
    registry.register("support", v1, base_model=base)
    registry.register("support", v2, base_model=base)
    registry.register("other", other, base_model=base)
    broken = tmp / "broken"
    shutil.copytree(v1, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    registry.register("broken", str(broken), base_model=base)
    return SimpleNamespace(base=base, registry=registry, v1=v1, v2=v2, other=other)


# ================================================================================ the Serve application


@pytest.fixture(scope="module")
def server(ray_cluster, assets):
    from openai import OpenAI
    from ray import serve

    from aigc.serve.run import run_server

    serve.shutdown()  # Serve's port is fixed when it starts: begin from a clean slate
    cfg = PlatformConfig.model_validate(
        {
            "registry_dir": assets.registry.root,
            "model": {"name_or_path": assets.base},
            "serve": {
                "port": free_port(),
                "app_name": "aigc-test",
                "max_tokens_cap": CAP,
                "default_max_tokens": 16,
                "max_adapters_per_replica": 2,
                "cpus_per_replica": 1,
                "autoscaling": {"min_replicas": 1, "max_replicas": 1},
            },
        }
    )
    url = run_server(cfg, blocking=False)
    client = OpenAI(base_url=url, api_key="none", timeout=TIMEOUT_S, max_retries=0)
    http = httpx.Client(base_url=url, timeout=TIMEOUT_S)
    yield SimpleNamespace(
        url=url,
        root=url.removesuffix("/v1"),
        client=client,
        http=http,
        app_name=cfg.serve.app_name,
        base_id="tiny-base",
    )
    http.close()
    serve.shutdown()


def _chat(server, model: str, **kw):
    kw = {"max_tokens": 16, "temperature": 0, **kw}
    return server.client.chat.completions.create(model=model, messages=MESSAGES, **kw)


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_models_lists_base_and_every_adapter_version(server):
    ids = [m.id for m in server.client.models.list().data]
    assert ids[0] == server.base_id
    for mid in ("support", "support:v1", "support:v2", "other", "other:v1"):
        assert mid in ids
    assert server.http.get(f"{server.root}/healthz").json()["status"] == "ok"


def test_chat_base_and_adapters(server):
    base = _chat(server, server.base_id)
    latest = _chat(server, "support")
    v1 = _chat(server, "support:v1")
    for r in (base, latest, v1):
        assert r.object == "chat.completion"
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content
        assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert latest.model == "support:v2"  # a bare name resolves to the latest version
    assert latest.choices[0].message.content != base.choices[0].message.content  # the adapter is applied
    assert v1.choices[0].message.content != latest.choices[0].message.content  # and the right version
    assert _chat(server, "support:v2").choices[0].message.content == latest.choices[0].message.content


def test_completions_endpoint(server):
    r = server.client.completions.create(model="support", prompt="The parcel", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8
    again = server.client.completions.create(model="support", prompt=["The parcel"], max_tokens=8, temperature=0)
    assert again.choices[0].text == r.choices[0].text


@pytest.mark.parametrize("model", ["tiny-base", "support:v1"])
def test_streaming_chat_matches_non_streamed(server, model):
    whole = _chat(server, model)
    stream = _chat(server, model, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2, pieces
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.id == chunks[0].id and c.model == model for c in chunks)


def test_streaming_raw_sse_ends_with_done(server):
    body = {
        "model": server.base_id,
        "prompt": "The parcel",
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    with server.http.stream("POST", "/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["text"] for c in chunks)
    whole = server.client.completions.create(model=server.base_id, prompt="The parcel", max_tokens=8, temperature=0)
    assert text == whole.choices[0].text


def test_streaming_raw_chat_sse_shapes(server):
    """The chat stream's events as OpenAI sends them: role first, then text, an empty finish delta, usage."""
    body = {**_raw_chat(server), "stream": True, "stream_options": {"include_usage": True}}
    with server.http.stream("POST", "/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    head = {"id": chunks[0]["id"], "object": "chat.completion.chunk", "created": chunks[0]["created"]}
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert all({k: c[k] for k in head} == head and c["model"] == server.base_id for c in chunks)
    choice = {"index": 0, "finish_reason": None, "logprobs": None}
    assert chunks[0]["choices"] == [{**choice, "delta": {"role": "assistant", "content": ""}}]
    assert chunks[0]["usage"] is None
    texts = chunks[1:-2]
    assert texts and all(c["choices"] == [{**choice, "delta": {"content": c["choices"][0]["delta"]["content"]}}]
                         for c in texts)  # fmt: skip
    whole = server.http.post("/chat/completions", json=_raw_chat(server)).json()
    finish = whole["choices"][0]["finish_reason"]
    assert "".join(c["choices"][0]["delta"]["content"] for c in texts) == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"] == [{**choice, "delta": {}, "finish_reason": finish}]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_chat_logprobs_and_n_choices_parse_as_the_openai_client_types_them(server):
    r = _chat(server, server.base_id, logprobs=True, top_logprobs=3, n=2)
    single = _chat(server, server.base_id)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:  # greedy: n identical texts, as OpenAI and vLLM give
        assert c.message.content == single.choices[0].message.content
        content = c.logprobs.content
        # the bytes are the reply's, a character split over tokens included (invalid UTF-8 the model emitted
        # reads as U+FFFD in the text)
        assert b"".join(bytes(t.bytes) for t in content).decode(errors="replace") == c.message.content
        for t in content:
            assert "\ufffd" in t.token or t.bytes == list(t.token.encode())
            assert t.logprob <= 0
            assert len(t.top_logprobs) == 3 and (t.top_logprobs[0].token, t.top_logprobs[0].logprob) == (
                t.token,
                t.logprob,
            )
    assert r.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counted once
    assert r.usage.completion_tokens == 2 * single.usage.completion_tokens
    assert single.choices[0].logprobs is None


def test_completions_logprobs_as_parallel_lists(server):
    r = server.client.completions.create(model="support", prompt="The parcel", max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(o < len(r.choices[0].text) for o in lp.text_offset)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == value == max(top.values())  # greedy: the chosen token is the likeliest
    chunks = list(
        server.client.completions.create(
            model="support", prompt="The parcel", max_tokens=8, temperature=0, logprobs=2, stream=True
        )
    )
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset  # offsets in the whole text


def test_streamed_n_choices_with_logprobs_and_usage(server):
    kw = {"temperature": 1.0, "seed": 9, "n": 3, "logprobs": True, "top_logprobs": 1}
    whole = _chat(server, server.base_id, **kw)
    chunks = list(_chat(server, server.base_id, stream=True, stream_options={"include_usage": True}, **kw))
    assert len({c.message.content for c in whole.choices}) > 1  # seed + index: distinct choices
    for c in whole.choices:
        mine = [ch for chunk in chunks for ch in chunk.choices if ch.index == c.index]
        assert mine[0].delta.role == "assistant"
        assert "".join(ch.delta.content or "" for ch in mine) == c.message.content
        assert [ch.finish_reason for ch in mine if ch.finish_reason] == [c.finish_reason]
        streamed = [t for ch in mine if ch.logprobs for t in ch.logprobs.content]
        assert [t.token for t in streamed] == [t.token for t in c.logprobs.content]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_n_and_logprobs_beyond_their_caps_are_400_naming_the_field(server):
    post = server.http.post
    chat = {"model": server.base_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    text = {"model": server.base_id, "prompt": "hi", "max_tokens": 2}
    for path, body, param in [
        ("/chat/completions", {**chat, "n": 9}, "n"),
        ("/chat/completions", {**chat, "n": 0}, "n"),
        ("/completions", {**text, "n": 9}, "n"),
        ("/chat/completions", {**chat, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/chat/completions", {**chat, "top_logprobs": 2}, "top_logprobs"),
        ("/completions", {**text, "logprobs": 6}, "logprobs"),
        ("/completions", {**text, "logprobs": True}, "logprobs"),
    ]:
        assert _error(post(path, json=body), 400)["param"] == param, body
    err = _error(post("/chat/completions", json={**chat, "top_logprobs": 2, "logprobs": False}), 400)
    assert err["message"] == "top_logprobs: top_logprobs needs logprobs: true"
    assert post("/chat/completions", json={**chat, "logprobs": False, "top_logprobs": 0}).status_code == 200


ORDER = {
    "type": "object",
    "properties": {"id": {"type": "string", "maxLength": 6}, "late": {"type": "boolean"},
                   "status": {"enum": ["shipped", "lost"]}},
    "required": ["id", "late", "status"],
    "additionalProperties": False,
}  # fmt: skip


def test_response_format_json_through_the_openai_client(server):
    """json_schema (n choices, sampled, an adapter; streamed), json_object on both endpoints, and the 400s."""
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER, "strict": True}}
    kw = {"temperature": 1.0, "seed": 3, "n": 2, "max_tokens": CAP, "response_format": fmt}
    whole = _chat(server, "support", **kw)
    for c in whole.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), ORDER)
    chunks = list(_chat(server, "support", stream=True, **kw))
    for c in whole.choices:
        assert "".join(ch.delta.content or "" for k in chunks for ch in k.choices if ch.index == c.index) == (
            c.message.content
        )
    obj = _chat(server, server.base_id, max_tokens=CAP, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason != "stop" or isinstance(json.loads(obj.choices[0].message.content), dict)
    text = server.client.completions.create(model=server.base_id, prompt="Order:", max_tokens=CAP, temperature=0,
                                            extra_body={"response_format": fmt})  # fmt: skip
    jsonschema.validate(json.loads(text.choices[0].text), ORDER)

    post, chat = server.http.post, {"model": server.base_id, "messages": MESSAGES, "max_tokens": 4}
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    err = _error(post("/chat/completions", json={**chat, "response_format": bad}), 400)
    assert err["param"] == "response_format" and "not a valid JSON Schema" in err["message"]
    tool = {"type": "function", "function": {"name": "track", "parameters": {"type": "object"}}}
    err = _error(post("/chat/completions", json={**chat, "response_format": fmt, "tools": [tool]}), 400)
    assert err["param"] == "response_format" and "tool_choice" in err["message"]


def _raw_chat(server) -> dict:
    return {"model": server.base_id, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}


def test_bad_requests_get_openai_errors(server):
    post = server.http.post
    ok = {"model": server.base_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    err = _error(post("/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert err["type"] == "invalid_request_error" and "not valid JSON" in err["message"]

    assert _error(post("/chat/completions", json={"model": server.base_id}), 400)["param"] == "messages"
    assert _error(post("/chat/completions", json={**ok, "messages": "hi"}), 400)["param"] == "messages"
    assert _error(post("/chat/completions", json={**ok, "messages": []}), 400)["param"] == "messages"
    bad_role = {**ok, "messages": [{"role": "robot", "content": "hi"}]}
    assert _error(post("/chat/completions", json=bad_role), 400)["param"] == "messages.0.role"
    assert _error(post("/chat/completions", json={**ok, "temperature": "hot"}), 400)["param"] == "temperature"
    assert _error(post("/chat/completions", json={**ok, "n": 9}), 400)["param"] == "n"
    assert _error(post("/completions", json={"model": server.base_id, "prompt": ["a", "b"]}), 400)["param"] == "prompt"

    err = _error(post("/chat/completions", json={**ok, "model": "no-such-model"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert server.base_id in err["message"] and "support:v2" in err["message"]
    assert _error(post("/chat/completions", json={**ok, "model": "support:v9"}), 404)["code"] == "model_not_found"

    for bad in (0, -1, CAP + 1):
        err = _error(post("/chat/completions", json={**ok, "max_tokens": bad}), 400)
        assert err["param"] == "max_tokens" and str(CAP) in err["message"]

    err = _error(post("/completions", json={"model": server.base_id, "prompt": "word " * 600}), 400)
    assert err["code"] == "context_length_exceeded"  # raised in the replica, mapped through Ray
    assert _error(server.http.get("/no/such/route"), 404)["type"] == "invalid_request_error"

    # A conversation that ends with the assistant is fine, and the server is still serving.
    ends_with_assistant = {**ok, "messages": [*ok["messages"], {"role": "assistant", "content": "Hello"}]}
    assert post("/chat/completions", json=ends_with_assistant).status_code == 200
    assert _chat(server, server.base_id).choices[0].message.content


def test_adapter_failure_is_500_and_server_keeps_serving(server):
    body = {"model": "broken", "messages": MESSAGES, "max_tokens": 4}
    for stream in (False, True):
        err = _error(server.http.post("/chat/completions", json={**body, "stream": stream}), 500)
        assert err["type"] == "server_error" and err["code"] == "adapter_load_failed"
        # The client learns where to look, never the exception text or a path of the server.
        assert err["message"].startswith("the model 'broken:v1' could not be loaded on this server; see the server log")
        assert "/" not in err["message"] and "safetensors" not in err["message"].lower()
    assert _chat(server, "support").choices[0].message.content


def test_lru_eviction_and_concurrent_adapters(server):
    from ray import serve

    models = [server.base_id, "support:v1", "support:v2", "other"]
    reference = {m: _chat(server, m).choices[0].message.content for m in models}
    generator = serve.get_deployment_handle("Generator", app_name=server.app_name)
    loaded = generator.loaded_adapters.remote().result(timeout_s=TIMEOUT_S)
    assert len(loaded) == 2  # max_adapters_per_replica: support:v1 was evicted and unloaded from peft

    # Concurrent requests for different adapters (forcing reloads and evictions) each get their own.
    order = models * 3
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda m: _chat(server, m).choices[0].message.content, order))
    assert got == [reference[m] for m in order]
    assert len(generator.loaded_adapters.remote().result(timeout_s=TIMEOUT_S)) <= 2


def test_errors_map_to_statuses_in_the_ingress():
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    from aigc.errors import ModelNotFoundError
    from aigc.serve.api_errors import api_error_from

    def raised_in_replica(exc: Exception) -> Exception:  # what the handle raises: Ray's wrapper, cause inside
        return RayTaskError("Generator.complete", "Traceback ...", exc).as_instanceof_cause()

    bad = InvalidRequestError("prompt too long", param="messages", code="context_length_exceeded")
    for exc in (bad, raised_in_replica(bad)):
        err = api_error_from(exc)
        assert (err.status, err.type, err.param, err.code) == (400, "invalid_request_error", "messages", bad.code)
        assert err.message == "prompt too long"

    err = api_error_from(raised_in_replica(ModelNotFoundError("The model 'gone:v1' does not exist")))
    assert (err.status, err.param, err.code, err.message) == (
        404,
        "model",
        "model_not_found",
        "The model 'gone:v1' does not exist",
    )

    err = api_error_from(BackPressureError(num_queued_requests=3, max_queued_requests=2))
    assert (err.status, err.type, err.code) == (503, "server_error", "overloaded")
    resp = err.response()
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert json.loads(resp.body) == {
        "error": {"message": "the server is overloaded; retry shortly", "type": "server_error", "param": None,
                  "code": "overloaded"}
    }  # fmt: skip


def test_unexpected_errors_become_a_generic_500():
    from aigc.errors import AdapterLoadError
    from aigc.serve.api_errors import api_error_from

    secret = "boom at /srv/secret/model.safetensors"
    ids = set()
    for exc in (RuntimeError(secret), KeyError(secret), AssertionError(secret)):
        err = api_error_from(exc)
        assert (err.status, err.type, err.param, err.code) == (500, "server_error", None, None)
        prefix, ref = err.message[:-1].rsplit(" ", 1)
        assert prefix == "internal error; see the server log (request id" and err.message.endswith(")")
        assert len(ref) == 12 and int(ref, 16) >= 0
        ids.add(ref)
    assert len(ids) == 3  # one id per failure, to find its traceback in the log

    err = api_error_from(AdapterLoadError(f"could not load adapter from {secret}"), model="broken:v1")
    assert (err.status, err.type, err.code) == (500, "server_error", "adapter_load_failed")
    assert err.message.startswith("the model 'broken:v1' could not be loaded on this server; see the server log")
    assert "boom" not in err.message and "/srv" not in err.message and "safetensors" not in err.message


def test_build_app_args_are_objects_not_text(monkeypatch):
    """Serve's YAML ``args`` reach the config as objects: a text that looks like YAML stays text."""
    from aigc.serve import builder

    seen = {}
    monkeypatch.setattr(builder, "build_app_from_config", lambda cfg: seen.setdefault("cfg", cfg))
    builder.build_app({"serve": {"base_model_id": "a: b"}, "data": {"system_prompt": None}})
    assert seen["cfg"].serve.base_model_id == "a: b" and seen["cfg"].data.system_prompt is None


def test_build_app_rejects_malformed_args():
    from aigc.errors import ConfigError
    from aigc.serve.builder import build_app

    with pytest.raises(ConfigError, match=r"^Serve args must be a mapping of config sections, got list$"):
        build_app(["configs/demo.yaml"])
    with pytest.raises(ConfigError, match=r"^args.config must be the path of a config file, got int$"):
        build_app({"config": 3})
    msg = "^args.overrides must be a list of 'section.key=value' strings, got 'serve.port=1'$"
    with pytest.raises(ConfigError, match=msg):
        build_app({"overrides": "serve.port=1"})


def test_build_app_args():
    from pathlib import Path

    from ray import serve

    from aigc.errors import ConfigError
    from serve_apps.openai_app import build_app

    args = {
        "model": {"name_or_path": str(Path(__file__).resolve().parents[1] / "assets" / "tiny-base")},
        "serve": {"autoscaling": {"max_replicas": 3}},
        "overrides": ["serve.max_tokens_cap=128"],
    }
    app = build_app(args)
    assert isinstance(app, serve.Application)
    # What the app deploys (Serve keeps an Application's root deployment and its bound arguments on it): the
    # ingress in front of one Generator, each with the replicas, caps and resources the config asked for.
    ingress = app._bound_deployment
    (bound,) = ingress.init_args
    generator = bound._bound_deployment
    assert (ingress.name, generator.name) == ("OpenAIIngress", "Generator")
    assert (ingress.num_replicas, ingress.max_ongoing_requests, ingress.ray_actor_options) == (
        2,
        256,
        {"num_cpus": 0.1},
    )
    assert (generator.max_ongoing_requests, generator.max_queued_requests) == (32, 32)
    assert generator.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.0}
    scaling = generator._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 24.0)
    assert (scaling.upscale_delay_s, scaling.downscale_delay_s) == (5.0, 30.0)
    assert ingress.init_kwargs["max_tokens_cap"] == 128 and generator.init_kwargs["max_batch_size"] == 32
    # The typed sections travel as objects (pickled by Serve), never as dicts to re-read.
    assert isinstance(ingress.init_kwargs["moderation"], ModerationConfig)
    assert isinstance(ingress.init_kwargs["security"], ServeConfig)
    with pytest.raises(ConfigError, match="serve.max_token_cap"):
        build_app({"serve": {"max_token_cap": 5}})


def test_overload_gets_503_with_retry_after(server, assets):
    """One generation at a time and one queued: of 8 simultaneous long streams, the surplus gets a prompt 503."""
    from ray import serve

    from aigc.serve.builder import build_app_from_config

    cfg = PlatformConfig.model_validate({
        "registry_dir": assets.registry.root,
        "model": {"name_or_path": assets.base},
        "serve": {"max_tokens_cap": CAP, "max_ongoing_requests": 1, "max_queued_requests": 1, "cpus_per_replica": 0.5,
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 1}},
    })  # fmt: skip
    serve.run(build_app_from_config(cfg), name="tight", route_prefix="/tight")
    try:
        body = {"model": server.base_id, "prompt": "Where is my parcel?", "max_tokens": CAP, "stream": True}

        def call(_: int) -> tuple[int, dict, float]:
            t0 = time.monotonic()
            with httpx.Client(timeout=TIMEOUT_S) as c:
                r = c.post(f"{server.root}/tight/v1/completions", json=body)
                return r.status_code, ({"retry": r.headers.get("retry-after"), **r.json()} if r.status_code != 200
                                       else {}), time.monotonic() - t0  # fmt: skip

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, range(8)))
    finally:
        serve.delete("tight")
    statuses = sorted(s for s, _, _ in results)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for status, body_, secs in results:
        if status == 503:
            assert body_["retry"] == "1" and body_["error"]["code"] == "overloaded"
            assert body_["error"]["type"] == "server_error"
            assert secs < 10  # refused at once, not after waiting for a slot


def test_many_concurrent_requests_on_one_replica(server):
    """24 callers at once over chat, completions and streaming on 2 models (no eviction): all succeed, each gets
    the answer it gets alone, streamed text equals non-streamed text."""
    models = [server.base_id, "support:v2"]
    alone = {m: _chat(server, m).choices[0].message.content for m in models}
    prompt = "Where is my parcel?"
    alone_completion = {m: server.client.completions.create(model=m, prompt=prompt, max_tokens=16, temperature=0)
                        .choices[0].text for m in models}  # fmt: skip

    def call(i: int) -> tuple[str, str, str]:
        m, kind = models[i % 2], ("chat", "chat-stream", "completion")[i % 3]
        if kind == "chat":
            return m, kind, _chat(server, m).choices[0].message.content
        if kind == "chat-stream":
            chunks = _chat(server, m, stream=True)
            return m, kind, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        r = server.client.completions.create(model=m, prompt=prompt, max_tokens=16, temperature=0)
        return m, kind, r.choices[0].text

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, range(24)))
    for m, kind, text in results:
        assert text == (alone_completion[m] if kind == "completion" else alone[m]), (m, kind)
    assert alone[models[0]] != alone[models[1]]


# ============================================================================= aliases move at request time
def _eventually(call, done, timeout_s: float = 15, tries: int = 60):
    """``call()`` until ``done(result)``, bounded in count and time; returns (result, seconds taken)."""
    t0 = time.monotonic()
    for _ in range(tries):
        result = call()
        if done(result) or time.monotonic() - t0 > timeout_s:
            return result, time.monotonic() - t0
        time.sleep(0.2)
    return result, time.monotonic() - t0


def test_resolver_reuses_answers_for_its_ttl(tmp_path, assets):
    from aigc.errors import RegistryError
    from aigc.serve.resolver import ModelResolver

    reg = Registry(str(tmp_path / "registry"))
    for adapter in (assets.v1, assets.v2):
        reg.register("bot", adapter, base_model=assets.base)
    now = [0.0]
    resolver = ModelResolver(reg, ttl_s=1.0, clock=lambda: now[0])
    assert asyncio.run(resolver.resolve("bot")).version == 2
    reg.promote("bot:v1")
    assert asyncio.run(resolver.resolve("bot")).version == 2  # within the TTL: the kept answer
    now[0] = 1.0
    assert asyncio.run(resolver.resolve("bot")).version == 1  # after it: the move is seen
    with pytest.raises(RegistryError, match="no alias 'stable'"):
        asyncio.run(resolver.resolve("bot:stable"))
    reg.promote("bot:v2", alias="stable")
    with pytest.raises(RegistryError, match="no alias 'stable'"):  # the miss is kept too
        asyncio.run(resolver.resolve("bot:stable"))
    now[0] = 2.0
    assert asyncio.run(resolver.resolve("bot:stable")).version == 2
    assert [a.model_id for a in asyncio.run(resolver.listing()).aliases] == ["bot", "bot:stable"]


def test_during_an_outage_ids_never_resolved_here_are_answered_from_the_last_listing(tmp_path, assets):
    from aigc.errors import ServiceUnavailableError
    from aigc.serve.resolver import ModelResolver

    class Flaky(Registry):
        down = False

        def resolve(self, model_id):
            if self.down:
                raise OSError("connection refused")
            return super().resolve(model_id)

    reg = Flaky(str(tmp_path / "registry"))
    for adapter in (assets.v1, assets.v2, assets.other):
        reg.register("bot", adapter, base_model=assets.base)
    reg.register("other", assets.v2, base_model=assets.base)
    reg.promote("bot:v2")
    reg.promote("bot:v1", alias="stable")
    ids = ["bot", "bot:stable", "bot:latest", "bot:v1", "bot:v3", "other", "other:latest"]
    truth = {i: reg.resolve(i).model_id for i in ids}
    assert truth["bot"] == "bot:v2" and truth["bot:latest"] == "bot:v3"  # the default alias, not the latest

    resolver = ModelResolver(reg, ttl_s=0)
    listing = asyncio.run(resolver.listing())
    assert {i: listing.find(i).model_id for i in ids} == truth  # the listing resolves as the registry does
    assert [listing.find(i) for i in ("bot:canary", "bot:v9", "nobody", "nobody:v1")] == [None] * 4

    reg.down = True
    assert asyncio.run(resolver.resolve("bot:stable")).model_id == "bot:v1"  # never resolved here before
    with pytest.raises(ServiceUnavailableError, match="registry is unreachable"):
        asyncio.run(resolver.resolve("bot:canary"))  # not in the listing either: 503, never a guess


def test_promote_and_rollback_reach_a_running_app_without_redeploy(server, assets):
    reg = assets.registry
    reg.register("rollout", assets.v1, base_model=assets.base)
    reg.register("rollout", assets.v2, base_model=assets.base)
    answer = {v: _chat(server, f"rollout:v{v}").choices[0].message.content for v in (1, 2)}
    assert answer[1] != answer[2]
    assert _chat(server, "rollout").model == "rollout:v2"  # nothing promoted: the latest

    def moved_to(version: int) -> float:
        r, secs = _eventually(lambda: _chat(server, "rollout"), lambda r: r.model == f"rollout:v{version}")
        assert r.model == f"rollout:v{version}", f"the alias move was not seen in {secs:.1f}s"
        assert r.choices[0].message.content == answer[version]  # answered by that version's weights
        return secs

    reg.promote("rollout:v1")
    assert moved_to(1) < 10  # serve.resolve_cache_s (1 s) plus a request or two (slow on a loaded machine)
    reg.promote("rollout:v2")
    moved_to(2)
    reg.rollback("rollout")
    moved_to(1)

    reg.promote("rollout:v2", alias="stable")
    stable, _ = _eventually(lambda: _chat(server, "rollout:stable"), lambda r: True)
    assert stable.model == "rollout:v2" and stable.choices[0].message.content == answer[2]
    cards, _ = _eventually(lambda: server.http.get("/models").json()["data"],
                           lambda d: any(c["id"] == "rollout:stable" for c in d))  # fmt: skip
    roots = {c["id"]: c["root"] for c in cards}
    assert roots["rollout"] == "rollout:v1" and roots["rollout:stable"] == "rollout:v2"

    err = _error(server.http.post("/chat/completions", json={"model": "rollout:nope", "messages": MESSAGES}), 404)
    assert err["code"] == "model_not_found" and "rollout:stable" in err["message"]


def test_an_alias_move_under_load_loses_no_request(server, assets):
    """4 clients send 48 requests for a bare name while it is promoted v1 -> v2: every one succeeds and is
    answered by v1 or v2, and by v2 alone once the resolution cache (1 s) has expired."""
    reg = assets.registry
    reg.register("underload", assets.v1, base_model=assets.base)
    reg.register("underload", assets.v2, base_model=assets.base)
    reg.promote("underload:v1")
    _eventually(lambda: _chat(server, "underload"), lambda r: r.model == "underload:v1")
    body = {"model": "underload", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    promoted_at = []

    def call(i: int) -> tuple[float, int, str | None]:
        if i == 16:
            reg.promote("underload:v2")
            promoted_at.append(time.monotonic())
        with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as c:
            t0 = time.monotonic()
            r = c.post("/chat/completions", json=body)
            return t0, r.status_code, r.json().get("model") if r.status_code == 200 else r.text

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(48)))
    assert [s for _, s, _ in results] == [200] * 48, [m for _, s, m in results if s != 200]
    assert {m for _, _, m in results} == {"underload:v1", "underload:v2"}, results
    # Past resolve_cache_s (1 s) + slack every answer is v2's; the 48 may all end sooner, so 4 more follow then.
    time.sleep(max(0.0, promoted_at[0] + 2.0 - time.monotonic()))
    results += [call(100 + i) for i in range(4)]
    late = [m for t0, _, m in results if t0 > promoted_at[0] + 2.0]
    assert len(late) >= 4 and set(late) == {"underload:v2"}, results

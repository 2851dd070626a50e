"""The endpoint under faults, through HTTP on a real Serve deployment (two generator replicas, two ingress replicas).

The base model is a tiny Llama with custom code (``trust_remote_code``, as some hub models ship): every forward pass
takes 20 ms (a slow device, so requests stay in flight long enough to hurt), and a prompt holding the words
``WEDGE WEDGE`` hangs its prefill forever (a hung device). The registry is on a local S3 server that the outage
test really stops. Replicas are SIGKILLed for real, found by their process title.

Figures printed here (``[fault]`` lines, ``pytest -s``) are the ones docs/RELIABILITY.md quotes.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import psutil
import pytest
from helpers import free_port, make_faulty_model, make_tiny_adapter

from aigc import storage
from aigc.config import PlatformConfig
from aigc.registry import Registry

TIMEOUT_S = 60
REQUEST_TIMEOUT_S = 6.0
ORDINARY = ["Where is my parcel?", "Hello", "The coffee grinder", "Returns are free", "Please send us", "Our team"]
APP = "aigc-faults"


def _config(assets, **serve) -> PlatformConfig:
    return PlatformConfig.model_validate(
        {
            "registry_dir": assets.registry_uri,
            "model": {"name_or_path": assets.base, "trust_remote_code": True},
            "serve": {
                "port": assets.port,
                "app_name": APP,
                "max_tokens_cap": 450,
                "default_max_tokens": 16,
                "cpus_per_replica": 1,
                "autoscaling": {"min_replicas": 2, "max_replicas": 2},
                "request_timeout_s": REQUEST_TIMEOUT_S,
                "engine_stall_timeout_s": 2,
                "health_check_period_s": 1,
                "graceful_shutdown_s": 30,
                "adapter_retry_s": 30,
                "ingress_replicas": 2,
                **serve,
            },
        }
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory, s3_server):
    tmp = tmp_path_factory.mktemp("serve-faults")
    base = make_faulty_model(tmp / "faulty-base", delay_s=0.02)
    local = Registry(str(tmp / "registry"))  # written here, then copied to S3 (and again after the outage)
    local.register("support", make_tiny_adapter(base, tmp / "support", seed=4), base_model=base)
    local.register("other", make_tiny_adapter(base, tmp / "other", seed=5), base_model=base)
    local.register("spare", make_tiny_adapter(base, tmp / "spare", seed=6), base_model=base)
    # An adapter of another base model that happens to have the same shape, and a full fine-tune.
    local.register("foreign", str(tmp / "other"), base_model="Org/another-base")
    local.register("fullft", base, base_model=base)
    uri = s3_server("registry")
    storage.copy_dir(local.root, uri)
    return SimpleNamespace(base=base, local=local, registry_uri=uri, s3=s3_server, port=free_port())


@pytest.fixture(scope="module")
def server(ray_cluster, assets):
    from ray import serve

    from aigc.serve.run import run_server

    serve.shutdown()  # Serve's port is fixed when it starts: begin from a clean slate
    url = run_server(_config(assets), blocking=False)
    http = httpx.Client(base_url=url, timeout=TIMEOUT_S)
    yield SimpleNamespace(url=url, http=http)
    http.close()
    serve.shutdown()


def _complete(server, prompt: str, **kw) -> httpx.Response:
    body = {"model": "faulty-base", "prompt": prompt, "max_tokens": 16, "temperature": 0, **kw}
    with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as c:
        return c.post("/completions", json=body)


def _stream(server, prompt: str, **kw) -> tuple[int, str, dict | None, str | None]:
    """(status, streamed text, the in-band error if any, finish_reason) of a streamed completion."""
    body = {"model": "faulty-base", "prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True, **kw}
    text, error, reason = [], None, None
    with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as c, c.stream("POST", "/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, "", r.json().get("error"), None
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                error = event["error"]
                continue
            for choice in event["choices"]:
                text.append(choice["text"])
                reason = choice["finish_reason"] or reason
    return 200, "".join(text), error, reason


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def _generator_pids() -> set[int]:
    """Process ids of this app's generator replicas (their process title names the deployment)."""
    title = f"ServeReplica:{APP}:Generator"
    pids = set()
    for p in psutil.process_iter(["cmdline"]):
        if title in " ".join(p.info["cmdline"] or []):
            pids.add(p.pid)
    return pids


def _wait_for(check, timeout_s: float, step_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step_s)


# ------------------------------------------------------------------------------ one tenant never hurts another
def test_a_hostile_temperature_fails_no_request_in_its_batch(server):
    alone = {p: _complete(server, p).json()["choices"][0]["text"] for p in ORDINARY}
    jobs = [(p, {}) for p in ORDINARY] + [("Hello", {"temperature": 1e-38, "top_p": 0.5})]
    barrier = threading.Barrier(len(jobs))

    def send(job):
        barrier.wait(timeout=30)
        return _complete(server, job[0], **job[1])

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(send, jobs))
    assert [r.status_code for r in got] == [200] * len(jobs), [r.text for r in got]
    assert {p: r.json()["choices"][0]["text"] for p, r in zip(ORDINARY, got, strict=False)} == alone
    assert got[-1].json()["choices"][0]["text"] == alone["Hello"]  # a temperature under the floor is greedy


def test_only_servable_models_are_listed_and_the_rest_are_refused_with_a_reason(server):
    ids = {m["id"] for m in server.http.get("/models").json()["data"]}
    assert {"faulty-base", "support", "support:v1", "other:v1"} <= ids
    assert not any(i.startswith(("foreign", "fullft")) for i in ids)
    body = {"prompt": "Hello", "max_tokens": 4}
    err = _error(server.http.post("/completions", json={**body, "model": "foreign"}), 400)
    assert err["code"] == "model_base_mismatch" and err["param"] == "model"
    assert "'Org/another-base'" in err["message"] and "'faulty-base'" in err["message"]
    err = _error(server.http.post("/completions", json={**body, "model": "fullft:v1"}), 400)
    assert err["code"] == "model_not_servable" and "full fine-tune" in err["message"]


def test_a_request_past_its_deadline_gets_504_and_a_stream_an_in_band_error(server):
    t0 = time.monotonic()
    r = _complete(server, "Where is my parcel?", max_tokens=440)  # 440 passes of >= 20 ms: past the 6 s deadline
    waited = time.monotonic() - t0
    err = _error(r, 504)
    assert err["code"] == "request_timeout" and REQUEST_TIMEOUT_S <= waited < REQUEST_TIMEOUT_S + 3
    status, text, error, reason = _stream(server, "Where is my parcel?", max_tokens=440)
    assert status == 200 and text and reason is None  # tokens were sent, then the deadline ended the stream
    assert error["code"] == "request_timeout" and error["type"] == "server_error"
    assert _complete(server, "Hello").status_code == 200


def test_readiness_asks_the_generators_and_liveness_does_not(server):
    root = server.url.removesuffix("/v1")
    assert httpx.get(f"{root}/healthz", timeout=10).json()["status"] == "ok"
    ready = httpx.get(f"{root}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


# ------------------------------------------------------------------------------ storage outage
def test_a_registry_outage_keeps_loaded_adapters_serving(server, assets):
    # A generator loads "support"; an ingress replica that never resolved it answers from its background listing.
    assert _complete(server, "Hello", model="support").status_code == 200
    assets.s3.cut()
    try:
        time.sleep(1.5)  # past resolve_cache_s: every answer now comes from an unreachable registry
        got = [_complete(server, "Hello", model="support") for _ in range(6)]
        assert [r.status_code for r in got] == [200] * 6, [r.text for r in got]
        assert server.http.get("/models").status_code == 200  # the last listing
        never_loaded = _complete(server, "Hello", model="spare")
        err = _error(never_loaded, 503)
        assert err["code"] == "registry_unavailable" and never_loaded.headers["retry-after"] == "1"
    finally:
        assets.s3.restore()  # the store comes back with what it held
    spare = _wait_for(lambda: (r := _complete(server, "Hello", model="spare")).status_code == 200 and r, 20)
    assert spare and spare.json()["model"] == "spare:v1"


# ------------------------------------------------------------------------------ losing a replica
def test_a_generator_replica_sigkilled_with_a_full_batch_in_flight(server):
    """24 requests in flight (half streamed) when one of the two generator replicas is SIGKILLed: nothing hangs,
    whole completions are retried on the other replica, streams that already sent text end with an in-band 503;
    then the replica is replaced and every request succeeds."""
    victims = _generator_pids()
    assert len(victims) == 2
    victim = sorted(victims)[0]

    def job(i: int):
        prompt = ORDINARY[i % len(ORDINARY)]
        t0 = time.monotonic()
        if i % 2:
            status, text, error, reason = _stream(server, prompt, max_tokens=60)
            ok = status == 200 and error is None and reason == "length"
            return "stream", ok, status, (error or {}).get("code"), time.monotonic() - t0
        r = _complete(server, prompt, max_tokens=60)
        code = r.json()["error"]["code"] if r.status_code != 200 else None
        return "whole", r.status_code == 200, r.status_code, code, time.monotonic() - t0

    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(job, i) for i in range(24)]
        time.sleep(0.8)  # every request is decoding (60 passes of >= 20 ms each)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        results = [f.result(timeout=REQUEST_TIMEOUT_S + 20) for f in futures]  # never a hang
    failed = [r for r in results if not r[1]]
    whole_failed = [r for r in failed if r[0] == "whole"]
    print(f"[fault] sigkill: {len(failed)}/24 failed ({[r[3] for r in failed]}), "
          f"slowest {max(r[4] for r in results):.1f}s")  # fmt: skip
    assert not whole_failed, whole_failed  # retried once on the surviving replica
    assert all(r[3] == "replica_unavailable" for r in failed), failed  # streams cut after text: a clear 503
    assert max(r[4] for r in results) < REQUEST_TIMEOUT_S + 5

    replaced = _wait_for(lambda: len(_generator_pids() - {victim}) == 2, 90)
    recovered_s = time.monotonic() - killed_at
    print(f"[fault] sigkill: replica replaced {recovered_s:.1f}s after the kill")
    assert replaced
    with ThreadPoolExecutor(16) as pool:
        after = list(pool.map(lambda i: _complete(server, ORDINARY[i % 6], max_tokens=20).status_code, range(16)))
    assert after == [200] * 16


def test_a_wedged_engine_fails_its_health_check_and_is_replaced(server):
    before = _generator_pids()
    t0 = time.monotonic()
    wedged = _complete(server, "please WEDGE WEDGE now", max_tokens=8)  # its prefill hangs forever
    err = _error(wedged, 504)
    assert err["code"] == "request_timeout" and time.monotonic() - t0 < REQUEST_TIMEOUT_S + 3
    # engine_stall_timeout_s 2 s, then 3 failed checks 1 s apart: Serve stops the replica and starts another.
    gone = _wait_for(lambda: len(before - _generator_pids()) == 1, 60)
    replaced_s = time.monotonic() - t0
    assert gone, "the wedged replica was never replaced"
    assert _wait_for(lambda: len(_generator_pids()) == 2, 90)
    print(f"[fault] wedge: replica replaced {replaced_s:.1f}s after the hung request arrived")
    with ThreadPoolExecutor(12) as pool:
        after = list(pool.map(lambda i: _complete(server, ORDINARY[i % 6]).status_code, range(12)))
    assert after == [200] * 12


# ------------------------------------------------------------------------------ draining on redeploy
def test_a_redeploy_drains_long_streams_before_replicas_go(server, assets):
    """Streams in flight when the app is redeployed with new settings (new generator and ingress replicas) all
    finish whole: old replicas take no new work and stop only once their streams are done."""
    from ray import serve

    from aigc.serve.builder import build_app_from_config

    # The streams must outlive the redeploy, not a deadline: on a loaded machine 120 tokens can take longer than
    # the module's 6 s request timeout, so the replicas they start on get a long one first.
    serve.run(build_app_from_config(_config(assets, request_timeout_s=120)), name=APP, route_prefix="/")
    old = _generator_pids()
    with ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(_stream, server, ORDINARY[i], max_tokens=120) for i in range(6)]
        time.sleep(0.8)
        cfg = _config(assets, max_batch_size=16, request_timeout_s=121)
        serve.run(build_app_from_config(cfg), name=APP, route_prefix="/")
        results = [f.result(timeout=150) for f in streams]
    # Each ends as an undisturbed stream would: its length, or the model's end of text (a cut stream has no
    # finish_reason, a lost one an error).
    assert all(s == 200 and e is None and r in ("length", "stop") and t for s, t, e, r in results), results
    assert _wait_for(lambda: not (old & _generator_pids()), 60)  # the old replicas are gone now
    assert _complete(server, "Hello").status_code == 200


# ------------------------------------------------------------------------------ no retry storm
def test_an_adapter_that_failed_to_load_is_answered_from_memory_until_its_retry_time(ray_cluster, assets, tmp_path):
    """A broken adapter costs one load per ``adapter_retry_s``, not one per request: the generator remembers the
    error (the registry is local here, so nothing else in the way)."""
    import asyncio

    from aigc.errors import AdapterLoadError
    from aigc.serve.generator import Generator

    registry = Registry(str(tmp_path / "registry"))
    broken = tmp_path / "broken"
    broken.mkdir()
    good = make_tiny_adapter(assets.base, tmp_path / "good", seed=8)
    (broken / "adapter_config.json").write_text((Path(good) / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    registry.register("broken", str(broken), base_model=assets.base)
    gen = Generator.func_or_class(assets.base, registry.root, "faulty-base", trust_remote_code=True,
                                  adapter_retry_s=1.5)  # fmt: skip
    loads = []
    real_load = gen._engine.load_adapter

    def counting_load(path, name):
        loads.append(name)
        return real_load(path, name)

    gen._engine.load_adapter = counting_load
    # Serve's multiplexing wrapper needs a replica; the loader it wraps is what a request reaches.
    gen.get_adapter = gen._load_adapter

    async def attempts(n: int) -> list[str]:
        errors = []
        for _ in range(n):
            with pytest.raises(AdapterLoadError) as err:
                await gen._get_adapter("broken:v1")
            errors.append(str(err.value))
        return errors

    try:
        first = asyncio.run(attempts(20))
        assert len(loads) == 1 and len(set(first)) == 1  # one load, the same error twenty times
        time.sleep(1.6)
        asyncio.run(attempts(5))
        assert len(loads) == 2  # tried again once the retry time passed
        assert gen._engine.adapters == []  # and neither attempt left an adapter behind
    finally:
        gen._engine.close()
        gen._stop_gauges.set()

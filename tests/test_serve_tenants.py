"""Many tenants on one endpoint: hashed keys and their lifecycle, auth that a proxy cannot bypass, per-key limits.

Unit tests first (the keys file and ``aigc keys``, reloading, the bind-address and forwarding-header rules, the
sliding windows, the fallback when the counter actor is unreachable), then one Serve app with two ingress
replicas and keys with policies, driven over HTTP.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi import Request  # at module level: the route below is annotated as text (future annotations)
from helpers import free_port, make_tiny_model, metric_value, wait_for_metrics

from aigc import cli
from aigc.config import PlatformConfig, ServeConfig
from aigc.errors import ConfigError
from aigc.serve.api_errors import ApiError
from aigc.serve.auth import KeyStore, check_exposure
from aigc.serve.keys import KeyPolicy, add_key, hash_key, read_records, revoke_key, write_records
from aigc.serve.limits import KeyCounters, duration
from aigc.serve.middleware import HttpGuard, install_guard
from aigc.serve.quota import Quota

TIMEOUT_S = 60
OLD_KEY = "ci-0123456789abcdefghij"
_NOT_LOCAL = "this server has no API keys configured, so it answers only clients on its own machine"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _printed_key(out: str) -> str:
    (key,) = re.findall(r"^sk-aigc-\S+$", out, flags=re.M)
    return key


# ============================================================================= keys file and `aigc keys`
def test_keys_add_prints_once_and_stores_only_the_hash(tmp_path, capsys):
    path = tmp_path / "keys.yaml"
    argv = ["keys", "add", "team-a", "--file", str(path), "--rpm", "60", "--tpm", "4000", "--concurrency", "2",
            "--models", "support-bot,tiny-base", "--expires", "2030-01-31"]  # fmt: skip
    assert cli.main(argv) == 0
    key = _printed_key(capsys.readouterr().out)
    text = path.read_text()
    assert key not in text and key[8:] not in text and hash_key(key) in text  # the hash only
    (record,) = read_records(str(path)).values()
    assert record.policy == KeyPolicy(60, 4000, 2, ("support-bot", "tiny-base"), 1896048000.0)

    assert cli.main(["keys", "list", "--file", str(path)]) == 0
    out = capsys.readouterr().out
    assert out == "team-a\trpm=60 tpm=4000 concurrency=2\tsupport-bot,tiny-base\texpires 2030-01-31T00:00:00Z\n"

    # The name is taken: rotation is add-new-then-revoke-old.
    assert cli.main(["keys", "add", "team-a", "--file", str(path)]) == 2
    assert "already has a key named 'team-a': to rotate, add the new key under another name" in capsys.readouterr().err
    assert cli.main(["keys", "revoke", "team-a", "--file", str(path)]) == 0
    assert capsys.readouterr().out == "[keys] revoked 'team-a': running servers refuse it within 2s\n"
    assert read_records(str(path)) == {}
    assert cli.main(["keys", "revoke", "team-a", "--file", str(path)]) == 2
    assert "has no key named 'team-a' (aigc keys list shows the names)" in capsys.readouterr().err
    assert cli.main(["keys", "list"]) == 2
    assert "no keys file: give --file PATH or set serve.api_keys_file" in capsys.readouterr().err


def test_old_plain_keys_file_is_read_and_migrated(tmp_path, capsys):
    path = tmp_path / "keys.yaml"
    path.write_text(f"ci: {OLD_KEY}\n")
    # The server still reads it (hashed in memory); `aigc keys` refuses to add to it and says how to migrate.
    assert KeyStore("keys", str(path)).current().match(OLD_KEY) == "ci"
    assert cli.main(["keys", "add", "new", "--file", str(path)]) == 2
    assert f"run `aigc keys migrate --file {path}` to store hashes instead of the keys" in capsys.readouterr().err
    assert cli.main(["keys", "migrate", "--file", str(path)]) == 0
    assert OLD_KEY not in path.read_text() and hash_key(OLD_KEY) in path.read_text()
    assert KeyStore("keys", str(path)).current().match(OLD_KEY) == "ci"  # the same key still works


def test_key_store_rereads_the_file_when_it_changes(tmp_path):
    path = str(tmp_path / "keys.yaml")
    key = add_key(path, "a", KeyPolicy(), now=0)
    now = [0.0]
    store = KeyStore("keys", path, reload_s=2.0, clock=lambda: now[0])
    assert store.current().match(key) == "a"
    revoke_key(path, "a")
    new = add_key(path, "b", KeyPolicy(rpm=5), now=0)
    now[0] = 1.9  # within the period: the file is not looked at
    assert store.current().match(key) == "a" and store.current().match(new) is None
    now[0] = 2.0
    assert store.current().match(key) is None and store.current().match(new) == "b"
    assert store.current().policy("b").rpm == 5
    Path(path).write_text("keys: {broken: {sha256: nothex}}\n")  # a bad edit keeps the keys in force
    now[0] = 4.0
    assert store.current().match(new) == "b"
    write_records(path, {})  # the last key revoked: nothing is accepted any more
    now[0] = 6.0
    assert store.current().match(new) is None and store.current().names == []


@pytest.fixture
def guarded_app(tmp_path):
    """The guard's middlewares around one echo route, with a hashed keys file."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    path = str(tmp_path / "keys.yaml")
    keys = {"live": add_key(path, "live", KeyPolicy(), now=0),
            "old": add_key(path, "old", KeyPolicy(expires=time.time() - 5), now=0)}  # fmt: skip
    guard = HttpGuard(ServeConfig(api_keys_file=path))
    app = FastAPI()
    install_guard(app, lambda: guard)

    @app.get("/v1/who")
    async def who(request: Request) -> dict:
        return {"key_name": request.state.key_name}

    with TestClient(app) as client:
        yield client, keys


def test_expired_key_gets_a_401_that_says_so(guarded_app):
    client, keys = guarded_app
    assert client.get("/v1/who", headers=_auth(keys["live"])).json() == {"key_name": "live"}
    resp = client.get("/v1/who", headers=_auth(keys["old"]))
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    err = resp.json()["error"]
    assert err["code"] == "expired_api_key" and err["type"] == "invalid_request_error"
    assert re.fullmatch(r"The API key 'old' expired at \S+Z; ask for a new key \(aigc keys add\)\.", err["message"])


# =========================================================================================== auth topology
@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded", "X-Real-IP"])
def test_forwarding_headers_never_count_as_local(header):
    """A proxy on this machine (nginx, a sidecar, kubectl port-forward) relays remote clients from 127.0.0.1."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    guard = HttpGuard(ServeConfig(auth="auto"))
    app = FastAPI()
    install_guard(app, lambda: guard)
    app.get("/v1/models")(lambda: {"data": []})
    with TestClient(app, client=("127.0.0.1", 5000)) as http:
        assert http.get("/v1/models").status_code == 200
        resp = http.get("/v1/models", headers={header: "for=203.0.113.7" if header == "Forwarded" else "127.0.0.1"})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "local_clients_only"
    assert resp.json()["error"]["message"].startswith(_NOT_LOCAL)


def test_exposed_bind_without_keys_is_refused_whatever_the_serve_yaml_says(monkeypatch, caplog):
    """``serve.host`` says loopback, but the proxy (a Serve YAML's http_options.host) binds 0.0.0.0."""
    from aigc.serve.builder import build_app_from_config

    expected = (
        "the Serve HTTP proxy's bind address (http_options.host) is '0.0.0.0', reachable from other machines, but "
        "no API keys are configured: set serve.api_keys_file or serve.api_keys_env (see docs/operations.md, "
        "Security), or set serve.auth=none to serve without keys on purpose (e.g. behind an authenticating proxy)"
    )
    # 1. In the ingress replica: the guard is built from the address the running proxy binds.
    with pytest.raises(ConfigError) as err:
        HttpGuard(ServeConfig(host="127.0.0.1"), proxy_host="0.0.0.0")
    assert str(err.value) == expected
    HttpGuard(ServeConfig(host="127.0.0.1"), proxy_host="127.0.0.1")  # loopback: allowed

    # 2. In the app builder (which `serve run app.yaml` calls after starting the proxy), before any model work.
    def no_model(*a, **k):
        raise AssertionError("the model was resolved")

    monkeypatch.setattr("aigc.serve.builder.proxy_bind_host", lambda default: "0.0.0.0")
    monkeypatch.setattr("aigc.serve.builder.resolve_model", no_model)
    with pytest.raises(ConfigError) as err:
        build_app_from_config(PlatformConfig.model_validate({"serve": {"host": "127.0.0.1"}}))
    assert str(err.value) == expected

    # 3. auth: none is explicit, and says so at start.
    with caplog.at_level("WARNING", logger="ray.serve"):
        check_exposure("0.0.0.0", "none", None, None)
    assert "serve.auth is 'none': requests are not authenticated and have no per-key limits" in caplog.text


# ================================================================================ sliding windows, headers
def test_duration_format_is_openais():
    assert [duration(s) for s in (0, 0.25, 1, 1.5, 59.9994, 60, 360, 61.25, 59.9996)] == [
        "0ms", "250ms", "1s", "1.5s", "59.999s", "1m0s", "6m0s", "1m1.25s", "1m0s",
    ]  # fmt: skip


def test_request_token_and_concurrency_windows():
    now = [1000.0]
    c = KeyCounters(clock=lambda: now[0])
    for i in range(3):  # rpm 3: three admitted, the fourth refused until the first leaves the window
        ok = c.acquire("k", 3, None, None, 60)
        assert ok["allowed"] and ok["headers"]["x-ratelimit-remaining-requests"] == str(2 - i)
        now[0] += 10
    no = c.acquire("k", 3, None, None, 60)
    assert (no["allowed"], no["type"], no["retry_after_s"]) == (False, "requests", 30.0)
    assert no["headers"] == {"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "0",
                             "x-ratelimit-reset-requests": "50s"}  # fmt: skip
    now[0] = 1060.0  # the first request left the window
    assert c.acquire("k", 3, None, None, 60)["allowed"]

    # tpm 100: admitted while below it; the request that crosses it is served, the next waits.
    c.add_tokens("t", 60)
    assert c.acquire("t", None, 100, None, 60)["headers"]["x-ratelimit-remaining-tokens"] == "40"
    c.add_tokens("t", 50)
    no = c.acquire("t", None, 100, None, 60)
    assert (no["allowed"], no["type"], no["retry_after_s"]) == (False, "tokens", 60.0)
    assert (
        no["message"]
        == "Rate limit reached for tokens per minute (TPM): limit 100, used 110. Please try again in 1m0s."
    )

    # concurrency 1: a second request waits for the first's release (or for its lease to expire).
    first = c.acquire("c", None, None, 1, 30)
    assert not c.acquire("c", None, None, 1, 30)["allowed"]
    c.release("c", first["lease"], tokens=7)
    second = c.acquire("c", None, None, 1, 30)
    assert second["allowed"] and not c.acquire("c", None, None, 1, 30)["allowed"]
    now[0] += 30  # the holder died without releasing: its slot comes back
    assert c.acquire("c", None, None, 1, 30)["allowed"]
    assert c.usage()["c"] == {"requests_1m": 3, "tokens_1m": 7, "in_flight": 1, "requests_total": 3, "tokens_total": 7}


# ======================================================================== counter unreachable: fail open
class _DeadActor:
    class acquire:  # noqa: N801 - mimics an actor method
        @staticmethod
        def remote(*args):
            raise RuntimeError("actor died")


class _HungActor:
    class acquire:  # noqa: N801
        @staticmethod
        def remote(*args):
            return asyncio.sleep(60)


@pytest.mark.parametrize("actor", [_DeadActor, _HungActor], ids=["dead", "hung"])
def test_unreachable_counter_falls_back_to_the_replicas_own_limits(actor, monkeypatch):
    """Fail open onto a per-replica limiter with the same limits; each such decision is counted as a metric."""
    events: list[str] = []
    recorder = SimpleNamespace(limiter_fallback=lambda: events.append("fallback"),
                               rate_limited=lambda key, kind: events.append(f"429 {key} {kind}"),
                               key_usage=lambda *a: None)  # fmt: skip
    monkeypatch.setattr("aigc.serve.quota.ingress_metrics", lambda: recorder)
    now = [0.0]
    made = []
    quota = Quota("t", lease_s=60, timeout_s=0.2, retry_s=5, counter_factory=lambda: made.append(1) or actor(),
                  clock=lambda: now[0])  # fmt: skip
    policy = KeyPolicy(rpm=2)

    async def run() -> ApiError:
        for _ in range(2):
            await (await quota.admit("k", policy)).finish(3, 4)
        with pytest.raises(ApiError) as err:
            await quota.admit("k", policy)
        return err.value

    err = asyncio.run(run())
    assert (err.status, err.type, err.code) == (429, "requests", "rate_limit_exceeded")
    assert err.headers["Retry-After"] == "60" and err.headers["x-ratelimit-remaining-requests"] == "0"
    assert events == ["fallback", "fallback", "fallback", "429 k requests"]
    assert made == [1]  # asked once, then left alone for retry_s
    assert quota.local.usage()["k"]["tokens_total"] == 14
    now[0] = 5.0
    with pytest.raises(ApiError):
        asyncio.run(quota.admit("k", policy))
    assert made == [1, 1]  # after retry_s it asks the actor again


# ============================================================= the Serve app: two ingress replicas, one counter
RELOAD_S = 1.0
APP = "aigc-tenants"


@pytest.fixture(scope="module")
def tenants(ray_cluster, tmp_path_factory):
    from ray import serve

    from aigc.serve.run import run_server

    tmp = tmp_path_factory.mktemp("tenants")
    base = make_tiny_model(tmp / "tiny-base")
    keys_file = str(tmp / "api-keys.yaml")
    free = add_key(keys_file, "free", KeyPolicy(), now=time.time())
    (tmp / "registry").mkdir()
    serve.shutdown()  # Serve's port is fixed when it starts: begin from a clean slate
    cfg = PlatformConfig.model_validate({
        "registry_dir": str(tmp / "registry"),
        "model": {"name_or_path": base},
        "serve": {"port": free_port(), "app_name": APP, "auth": "keys", "api_keys_file": keys_file,
                  "api_keys_reload_s": RELOAD_S, "ingress_replicas": 2, "max_tokens_cap": 16,
                  "default_max_tokens": 4, "cpus_per_replica": 1,
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
    })  # fmt: skip
    url = run_server(cfg, blocking=False)

    def new_key(name: str, **policy) -> str:
        """A key added while the server runs: in force within the reload period."""
        key = add_key(keys_file, name, KeyPolicy(**policy), now=time.time())
        time.sleep(RELOAD_S * 1.2)
        return key

    yield SimpleNamespace(url=url, base_id="tiny-base", keys_file=keys_file, free=free, new_key=new_key)
    serve.shutdown()


def _chat(t, key: str, **kw) -> httpx.Response:
    body = {"model": t.base_id, "messages": [{"role": "user", "content": "Where is my parcel?"}], "max_tokens": 4,
            "temperature": 0, **kw}  # fmt: skip
    return httpx.post(f"{t.url}/chat/completions", json=body, headers=_auth(key), timeout=TIMEOUT_S)


def _ingress_logs() -> dict[str, str]:
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return {p.name: p.read_text(errors="replace") for p in logs.rglob(f"replica_{APP}_OpenAIIngress*") if p.is_file()}


def _rate_limited(resp: httpx.Response, kind: str) -> dict:
    assert resp.status_code == 429, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["code"], err["param"]) == (kind, "rate_limit_exceeded", None)
    assert 1 <= int(resp.headers["retry-after"]) <= 60
    return err


def test_rpm_holds_across_two_ingress_replicas(tenants):
    """Seven requests at once for a key with rpm 4: exactly four are served, by both replicas, three get 429."""
    key = tenants.new_key("rpm-team", rpm=4)

    async def burst() -> list[httpx.Response]:
        body = {"model": tenants.base_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with httpx.AsyncClient(timeout=TIMEOUT_S, headers=_auth(key)) as http:
            return await asyncio.gather(*[http.post(f"{tenants.url}/chat/completions", json=body) for _ in range(7)])

    responses = asyncio.run(burst())
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(ok) == 4 and len(refused) == 3, [r.status_code for r in responses]
    # Served: OpenAI's headers, each admission counted once (remaining 3, 2, 1, 0 in some order).
    assert sorted(r.headers["x-ratelimit-remaining-requests"] for r in ok) == ["0", "1", "2", "3"]
    for r in ok:
        assert r.headers["x-ratelimit-limit-requests"] == "4"
        assert r.headers["x-ratelimit-reset-requests"] == "1m0s"  # the window is full again a minute after it
        assert "x-ratelimit-limit-tokens" not in r.headers  # the key has no token limit
    for r in refused:
        err = _rate_limited(r, "requests")
        assert err["message"].startswith("Rate limit reached for requests per minute (RPM): limit 4, used 4.")
        assert (r.headers["x-ratelimit-limit-requests"], r.headers["x-ratelimit-remaining-requests"]) == ("4", "0")
        assert re.fullmatch(r"5\d(\.\d+)?s|1m0s", r.headers["x-ratelimit-reset-requests"])
    # Both ingress replicas answered (each logs its requests under its own file), and logged the key's name.
    deadline = time.monotonic() + 20  # replicas write their logs asynchronously: a loaded machine lags
    while True:
        logs = _ingress_logs()
        served_by = {name for name, text in logs.items() for r in responses if r.headers["x-request-id"] in text}
        if len(served_by) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(served_by) == 2, sorted(logs)
    assert all(any(f"{r.json()['id']}: key rpm-team," in t for t in logs.values()) for r in ok)
    assert not any(key in t for t in logs.values())


def test_tpm_refuses_the_request_after_the_one_that_crossed_it(tenants):
    from openai import OpenAI, RateLimitError

    first = _chat(tenants, tenants.free)
    used = first.json()["usage"]["total_tokens"]
    key = tenants.new_key("tpm-team", tpm=used + 1)  # room for one request, and a token more
    a, b = _chat(tenants, key), _chat(tenants, key)
    assert (a.status_code, b.status_code) == (200, 200)
    assert a.headers["x-ratelimit-limit-tokens"] == str(used + 1)
    assert (a.headers["x-ratelimit-remaining-tokens"], b.headers["x-ratelimit-remaining-tokens"]) == (
        str(used + 1),
        "1",
    )
    err = _rate_limited(_chat(tenants, key), "tokens")
    assert err["message"].startswith(
        f"Rate limit reached for tokens per minute (TPM): limit {used + 1}, used {2 * used}."
    )
    # The official client sees OpenAI's RateLimitError.
    client = OpenAI(base_url=tenants.url, api_key=key, timeout=TIMEOUT_S, max_retries=0)
    with pytest.raises(RateLimitError) as exc:
        client.chat.completions.create(model=tenants.base_id, messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 429 and exc.value.code == "rate_limit_exceeded"


def test_concurrency_limit_and_allowed_models(tenants):
    key = tenants.new_key("one-at-a-time", concurrency=1, models=[tenants.base_id])
    streamed = {"stream": True, "max_tokens": 16}
    # One at a time: never refused, streams included (a stream holds its slot until its last event).
    assert [_chat(tenants, key, **(streamed if i % 2 else {})).status_code for i in range(4)] == [200] * 4

    async def burst() -> list[httpx.Response]:
        body = {"model": tenants.base_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
        async with httpx.AsyncClient(timeout=TIMEOUT_S, headers=_auth(key)) as http:
            return await asyncio.gather(*[http.post(f"{tenants.url}/chat/completions", json=body) for _ in range(4)])

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert statuses[0] == 200 and statuses[-1] == 429, statuses  # at once: one is served, the others wait
    err = _rate_limited(next(r for r in responses if r.status_code == 429), "requests")
    assert err["message"].startswith("Rate limit reached for concurrent requests: limit 1, in progress 1.")
    with httpx.Client(timeout=TIMEOUT_S, headers=_auth(key)) as http:
        # Models: only the allowed ones are listed, and another one is OpenAI's 404.
        assert [m["id"] for m in http.get(f"{tenants.url}/models").json()["data"]] == [tenants.base_id]
        resp = _chat(tenants, key, model="support-bot")
        assert resp.status_code == 404 and resp.json()["error"] == {
            "message": "The model 'support-bot' does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }


def test_revoked_key_is_refused_within_the_reload_interval(tenants, capsys):
    key = tenants.new_key("leaked")
    assert _chat(tenants, key).status_code == 200
    assert (
        cli.main(["keys", "revoke", "leaked", "--file", tenants.keys_file, f"serve.api_keys_reload_s={RELOAD_S}"]) == 0
    )
    assert capsys.readouterr().out == f"[keys] revoked 'leaked': running servers refuse it within {RELOAD_S:g}s\n"
    time.sleep(RELOAD_S + 0.2)  # no restart: each replica re-reads the file on its next request
    for _ in range(6):  # every replica refuses it
        resp = _chat(tenants, key)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    assert _chat(tenants, tenants.free).status_code == 200


def test_keys_usage_and_usage_metrics(tenants, capsys):
    from aigc.serve.auth import proxy_bind_host

    assert proxy_bind_host("not asked") == "127.0.0.1"  # the running proxy's own http_options.host
    assert _chat(tenants, tenants.free).status_code == 200
    assert cli.main(["keys", "usage", f"serve.app_name={APP}"]) == 0
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["rpm-team"][0] == "4" and rows["rpm-team"][3] == "4"  # requests in the last minute, in total
    assert int(rows["free"][4]) > 0 and int(rows["tpm-team"][1]) > 0  # tokens counted for every key

    def counted(text: str) -> bool:
        tokens = metric_value(text, "ray_aigc_key_tokens_total", key="free", kind="completion")
        return tokens > 0 and metric_value(text, "ray_aigc_rate_limited_total", key="rpm-team", type="requests") >= 3

    assert counted(wait_for_metrics(counted))


def test_unreachable_counter_fails_open_per_replica(tenants):
    """The counter actor is killed: requests go on, limited by each replica alone, and the fallback is counted."""
    import ray

    from aigc.serve.quota import ACTOR_NAMESPACE, actor_name

    key = tenants.new_key("during-outage", rpm=50)
    assert _chat(tenants, key).headers["x-ratelimit-remaining-requests"] == "49"  # from the cluster's counter
    ray.kill(ray.get_actor(actor_name(APP), namespace=ACTOR_NAMESPACE), no_restart=True)
    resp = _chat(tenants, key)
    assert resp.status_code == 200 and resp.headers["x-ratelimit-remaining-requests"] == "49"  # a fresh local count

    def fell_back(text: str) -> bool:
        return metric_value(text, "ray_aigc_limiter_fallback_total") >= 1

    assert fell_back(wait_for_metrics(fell_back))

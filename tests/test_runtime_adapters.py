"""Adapters loaded into a running server by name (POST/DELETE /v1/adapters): admin keys only, served by every
replica from a record beside the registry, refused when they cannot load, unloaded from the replica after DELETE."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from aigc.errors import ConfigError, RegistryError
from aigc.registry import Registry
from aigc.registry.runtime import ServedModels
from aigc.serve.keys import KeyPolicy, add_key, read_records
from tests.helpers import free_port, make_tiny_adapter, make_tiny_model

TIMEOUT_S = 60.0
PROMPT = [{"role": "user", "content": "Where is my parcel?"}]


def test_the_admin_flag_is_stored_and_checked(tmp_path):
    path = str(tmp_path / "keys.yaml")
    add_key(path, "ops", KeyPolicy(admin=True), now=0)
    add_key(path, "app", KeyPolicy(rpm=5), now=0)
    records = read_records(path)
    assert records["ops"].policy.admin is True and records["app"].policy.admin is False
    assert "admin: true" in Path(path).read_text() and Path(path).read_text().count("admin") == 1
    Path(path).write_text(Path(path).read_text().replace("admin: true", "admin: 'yes'"))
    with pytest.raises(ConfigError, match="key 'ops': admin must be true or false, got 'yes'"):
        read_records(path)


def test_runtime_records_resolve_by_bare_name_and_never_shadow_a_registered_name(tmp_path):
    base = make_tiny_model(tmp_path / "base")
    adapter = make_tiny_adapter(base, tmp_path / "a")
    served = ServedModels(Registry(str(tmp_path / "reg")))
    with pytest.raises(RegistryError):
        served.resolve("hot")
    served.runtime.add("hot", adapter, "tiny", "ops")
    entry = served.resolve("hot")
    assert (entry.model_id, entry.adapter_uri, entry.runtime, entry.config) == ("hot", adapter, True,
                                                                               {"loaded_by": "ops"})  # fmt: skip
    assert served.resolve_split("hot") == [(entry, 1)]
    with pytest.raises(RegistryError):
        served.resolve("hot:v1")  # a runtime adapter has no versions
    assert [e.model_id for e in served.list()] == ["hot"]
    # registering the name later: the registered version wins everywhere
    served.registry.register("hot", adapter, "tiny")
    assert served.resolve("hot").model_id == "hot:v1" and [e.model_id for e in served.list()] == ["hot:v1"]
    assert served.runtime.remove("hot") and not served.runtime.remove("hot")


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from ray import serve

    from aigc.config import PlatformConfig
    from aigc.serve.run import run_server

    tmp = tmp_path_factory.mktemp("runtime-adapters")
    base = make_tiny_model(tmp / "base")
    keys = str(tmp / "keys.yaml")
    admin, user = add_key(keys, "ops", KeyPolicy(admin=True), now=0), add_key(keys, "app", KeyPolicy(), now=0)
    Registry(str(tmp / "registry")).register("reg", make_tiny_adapter(base, tmp / "a1", seed=1), base)
    bad = tmp / "bad"
    bad.mkdir()
    config = json.loads((tmp / "a1" / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["no_such_proj"]}))
    (bad / "adapter_model.safetensors").write_bytes((tmp / "a1" / "adapter_model.safetensors").read_bytes())
    serve.shutdown()
    cfg = PlatformConfig.model_validate({
        "registry_dir": str(tmp / "registry"), "model": {"name_or_path": base},
        "serve": {"port": free_port(), "app_name": "aigc-runtime", "auth": "keys", "api_keys_file": keys,
                  "resolve_cache_s": 0.5, "cpus_per_replica": 1,
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1}}})  # fmt: skip
    url = run_server(cfg, blocking=False)
    clients = {who: httpx.Client(base_url=url, timeout=TIMEOUT_S, headers={"Authorization": f"Bearer {key}"})
               for who, key in (("admin", admin), ("user", user))}  # fmt: skip
    yield {"url": url, "tmp": tmp, "bad": str(bad), "base_id": "base", **clients,
           "a1": str(tmp / "a1"), "a2": make_tiny_adapter(base, tmp / "a2", seed=2)}  # fmt: skip
    for c in clients.values():
        c.close()
    serve.shutdown()


def _answer(client: httpx.Client, model: str) -> httpx.Response:
    return client.post("/chat/completions", json={"model": model, "messages": PROMPT, "max_tokens": 8,
                                                  "temperature": 0})  # fmt: skip


def _text(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def _engine_names() -> list[str]:
    from ray import serve

    generator = serve.get_deployment_handle("Generator", app_name="aigc-runtime")
    return generator.loaded_adapters.remote().result(timeout_s=TIMEOUT_S)


def test_an_admin_loads_serves_and_unloads_an_adapter_by_name(server):
    admin, user = server["admin"], server["user"]
    refused = user.post("/adapters", json={"name": "hot", "path": server["a1"]})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_required"
    assert user.delete("/adapters/hot").status_code == 403

    loaded = admin.post("/adapters", json={"name": "hot", "path": server["a1"]})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json() | {"created": 0} == {"id": "hot", "object": "model", "created": 0, "owned_by": "aigc",
                                              "root": "hot", "parent": server["base_id"]}  # fmt: skip
    cards = {m["id"]: m for m in user.get("/models").json()["data"]}
    assert cards["hot"]["parent"] == server["base_id"] and "hot:v0" not in cards
    # the same weights as the registered version made from the same directory, and not the base model's answer
    hot = _text(_answer(user, "hot"))
    assert hot == _text(_answer(user, "reg:v1")) and hot != _text(_answer(user, server["base_id"]))
    assert _answer(user, "hot").json()["model"] == "hot"
    # vLLM's field names work too
    assert admin.post("/adapters", json={"lora_name": "hot2", "lora_path": server["a2"]}).status_code == 200
    hot2 = _text(_answer(user, "hot2"))
    assert hot2 != hot

    assert any(n.startswith("hot_v0_") for n in _engine_names())
    gone = admin.delete("/adapters/hot")
    assert gone.status_code == 200 and gone.json() == {"id": "hot", "object": "model", "deleted": True}
    # every ingress replica stops resolving it within serve.resolve_cache_s, and the generator replica unloads
    # it within its sweep period (2 s): bounded, like an alias move
    deadline = time.monotonic() + 30
    while (missing := _answer(user, "hot")).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    while any(n.startswith("hot_v0_") for n in _engine_names()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(n.startswith("hot_v0_") for n in _engine_names())
    assert admin.delete("/adapters/hot").json()["error"]["code"] == "model_not_found"

    # the same name loaded again from other weights serves those weights (the stale cache entry reloads)
    assert admin.post("/adapters", json={"name": "hot", "path": server["a2"]}).status_code == 200
    assert _text(_answer(user, "hot")) == hot2


def test_adapters_that_cannot_be_served_are_refused_with_their_reason(server):
    admin = server["admin"]

    def refused(body: dict, status: int, code: str) -> str:
        resp = admin.post("/adapters", json=body)
        assert resp.status_code == status, resp.text
        assert resp.json()["error"]["code"] == code
        return resp.json()["error"]["message"]

    assert "'reg' is a registered model" in refused({"name": "reg", "path": server["a1"]}, 409, "name_taken")
    assert "base model's id" in refused({"name": server["base_id"], "path": server["a1"]}, 409, "name_taken")
    nowhere = str(server["tmp"] / "nowhere")
    assert refused({"name": "x", "path": nowhere}, 400, "adapter_not_found") == (
        f"no PEFT adapter at {nowhere} (no adapter_config.json there)")  # fmt: skip
    assert "did not load" in refused({"name": "bad", "path": server["bad"]}, 400, "adapter_load_failed")
    assert "bad" not in {m["id"] for m in admin.get("/models").json()["data"]}  # nothing kept of a failed load
    assert refused({"name": "bad name!", "path": server["a1"]}, 400, "invalid_name")
    assert admin.post("/adapters", json={"name": "x"}).status_code == 400  # no path

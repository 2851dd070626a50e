"""The registry on a local directory and on a local S3 server: versions, races, bad ids, torn files, full models."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from aigc import storage
from aigc.errors import RegistryError
from aigc.registry import Registry


def _adapter(d: Path, tag: str = "a") -> str:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "tag": tag}))
    (d / "adapter_model.safetensors").write_bytes(b"weights-" + tag.encode())
    return str(d)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "registry")
    return request.getfixturevalue("s3_server")("registry")


def test_register_list_resolve_and_read_back(root, tmp_path):
    reg = Registry(root)
    e1 = reg.register("bot", _adapter(tmp_path / "a1", "one"), base_model="base", metrics={"eval_loss": 1.5})
    e2 = reg.register("bot", _adapter(tmp_path / "a2", "two"), base_model="base")
    reg.register("other", _adapter(tmp_path / "a3"), base_model="base")
    assert (e1.model_id, e2.model_id, e1.kind) == ("bot:v1", "bot:v2", "lora")
    assert reg.names() == ["bot", "other"] and reg.versions("bot") == [1, 2]
    assert [e.model_id for e in reg.list()] == ["bot:v1", "bot:v2", "other:v1"]
    assert reg.resolve("bot").version == 2 and reg.resolve("bot:v1").metrics == {"eval_loss": 1.5}
    local = Path(reg.local_adapter_dir(reg.resolve("bot:v1")))
    assert (local / "adapter_model.safetensors").read_bytes() == b"weights-one"


@pytest.mark.parametrize(
    ("model_id", "message"),
    [
        ("../../etc", "invalid model name '../../etc'"),
        ("a" * 5000, "invalid model id 'aaaaaaaa"),
        ("bot\x00x", "invalid model name 'bot\\\\0x'"),
        ("a:b:c", "invalid model id 'a:b:c'"),
        ("bot:v", "has no alias 'v'"),
        ("bot:v007", "version must look like v3"),
        ("bot:v0", "version must look like v3"),
        ("missing", "no model named 'missing'"),
    ],
)
def test_bad_ids_are_registry_errors_that_leak_nothing(tmp_path, model_id, message):
    reg = Registry(str(tmp_path / "registry"))
    reg.register("bot", _adapter(tmp_path / "a"), base_model="base")
    with pytest.raises(RegistryError) as err:
        reg.resolve(model_id)
    assert message in str(err.value)
    assert len(str(err.value)) < 300
    if model_id != "missing":
        assert str(tmp_path) not in str(err.value)


def test_torn_meta_json_is_skipped_not_fatal(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    reg.register("bot", _adapter(tmp_path / "a1"), base_model="base")
    reg.register("bot", _adapter(tmp_path / "a2", "b"), base_model="base")
    (tmp_path / "registry" / "bot" / "v2" / "meta.json").write_text('{"name": "bot", "vers')
    assert [e.model_id for e in reg.list()] == ["bot:v1"]
    with pytest.raises(RegistryError, match="unreadable meta.json"):
        reg.resolve("bot:v2")


def test_full_model_directory_registers_as_full(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"w")
    entry = Registry(str(tmp_path / "registry")).register("full-bot", str(model), base_model="base")
    assert entry.kind == "full" and Path(entry.adapter_uri, "model.safetensors").is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="neither a PEFT adapter directory"):
        Registry(str(tmp_path / "registry")).register("x", str(tmp_path / "empty"), base_model="base")


def _register_after(barrier, root: str, src: str, out) -> None:
    barrier.wait(timeout=60)
    out.put(Registry(root).register("race", src, base_model="base").version)


def test_two_processes_registering_at_once_get_two_versions(root, tmp_path):
    """Both processes start at one barrier; an absence-check-then-create claim would hand both the same version."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    srcs = [_adapter(tmp_path / f"r{i}", str(i)) for i in range(3)]
    procs = [ctx.Process(target=_register_after, args=(barrier, root, s, out)) for s in srcs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    versions = sorted(out.get(timeout=10) for _ in procs)
    assert versions == [1, 2, 3]
    reg = Registry(root)
    tags = sorted(storage.read_text(storage.join(reg.resolve(f"race:v{v}").adapter_uri, "adapter_config.json"))
                  for v in versions)  # fmt: skip
    assert tags == sorted(storage.read_text(str(Path(s) / "adapter_config.json")) for s in srcs)

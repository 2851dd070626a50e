"""Registry aliases: promote, resolve, rollback with history, errors that name what is wrong, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aigc import storage
from aigc.cli import main
from aigc.errors import RegistryError
from aigc.registry import Registry


def _adapter(d: Path, tag: str) -> str:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "tag": tag}))
    (d / "adapter_model.safetensors").write_bytes(b"weights-" + tag.encode())
    return str(d)


@pytest.fixture(params=["local", "s3"])
def reg(request, tmp_path) -> Registry:
    root = str(tmp_path / "registry") if request.param == "local" else request.getfixturevalue("s3_server")("reg")
    r = Registry(root)
    for i in (1, 2, 3):
        r.register("bot", _adapter(tmp_path / f"a{i}", str(i)), base_model="base")
    return r


def test_bare_name_is_latest_until_promoted_then_the_promoted_version(reg, tmp_path):
    assert reg.resolve("bot").version == 3 and reg.aliases() == []
    alias, before = reg.promote("bot:v2")
    assert (alias.model_id, alias.target, before) == ("bot", "bot:v2", None)
    assert reg.resolve("bot").version == 2
    assert reg.resolve("bot:latest").version == 3 and reg.resolve("bot:v3").version == 3
    reg.register("bot", _adapter(tmp_path / "a4", "4"), base_model="base")  # a new version: bare name stays
    assert reg.resolve("bot").version == 2 and reg.resolve("bot:latest").version == 4


def test_registering_the_same_weights_again_returns_the_existing_version(reg, tmp_path):
    """A run killed between registering and recording it registers again on the re-run: no duplicate."""
    v1 = reg.resolve("bot:v1")
    again = reg.register("bot", v1.adapter_uri, base_model="base", metrics={"eval_loss": 9.0})
    assert (again.model_id, again.metrics, again.content_hash) == ("bot:v1", v1.metrics, v1.content_hash)
    assert reg.versions("bot") == [1, 2, 3]
    assert reg.register("bot", v1.adapter_uri, base_model="another-base").version == 4  # other base: new
    changed = Path(_adapter(tmp_path / "changed", "1"))
    (changed / "adapter_model.safetensors").write_bytes(b"other weights")
    assert reg.register("bot", str(changed), base_model="base").version == 5  # one byte differs: new


def test_named_alias_promote_rollback_and_history(reg):
    reg.promote("bot:v1", alias="stable")
    _, before = reg.promote("bot:v2", alias="stable")
    assert before == 1
    reg.promote("bot:v3", alias="stable")
    assert reg.resolve("bot:stable").version == 3 and reg.resolve("bot").version == 3  # bare name untouched
    alias, undone = reg.rollback("bot", alias="stable")
    assert (alias.target, undone, reg.resolve("bot:stable").version) == ("bot:v2", 3, 2)
    reg.rollback("bot", alias="stable")
    assert reg.resolve("bot:stable").version == 1
    with pytest.raises(RegistryError, match=r"bot:stable -> v1 has no previous target"):
        reg.rollback("bot", alias="stable")
    # Promoting from another alias copies the version it points at now.
    reg.promote("bot:stable", alias="canary")
    assert [(a.model_id, a.version) for a in reg.aliases("bot")] == [("bot:canary", 1), ("bot:stable", 1)]


def test_promoting_the_current_target_changes_nothing(reg):
    reg.promote("bot:v1")
    reg.promote("bot:v2")
    alias, before = reg.promote("bot:v2")
    assert before == 2 and [h["version"] for h in alias.history] == [1]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: r.promote("bot:v9"), r"model 'bot' has no version 9 \(have \[1, 2, 3\]\)"),
        (lambda r: r.promote("nobody:v1"), "no model named 'nobody'"),
        (lambda r: r.promote("bot:v1", alias="v2"), "alias 'v2' is reserved"),
        (lambda r: r.promote("bot:v1", alias="latest"), "alias 'latest' is reserved"),
        (lambda r: r.promote("bot:v1", alias="../x"), "invalid alias '../x'"),
        (
            lambda r: r.resolve("bot:stable"),
            r"model 'bot' has no alias 'stable' \(aliases: none; versions: \[1, 2, 3\]\)",
        ),
        (lambda r: r.rollback("bot"), "bot has no alias set"),
        (lambda r: r.resolve("bot:../../x"), "invalid alias"),
    ],
)
def test_errors_name_what_is_wrong(reg, call, message):
    with pytest.raises(RegistryError, match=message) as err:
        call(reg)
    if "no model named" not in message:  # that one names the registry it looked in, on purpose
        assert reg.root not in str(err.value)


def test_rollback_refuses_a_target_no_longer_published(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    for i in (1, 2):
        reg.register("bot", _adapter(tmp_path / f"a{i}", str(i)), base_model="base")
    reg.promote("bot:v1")
    reg.promote("bot:v2")
    (tmp_path / "registry" / "bot" / "v1" / "meta.json").unlink()
    with pytest.raises(RegistryError, match="cannot roll back to v1: it is no longer published"):
        reg.rollback("bot")
    assert reg.resolve("bot").version == 2


def test_a_torn_alias_file_is_an_error_not_a_silent_fallback(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    reg.register("bot", _adapter(tmp_path / "a1", "1"), base_model="base")
    reg.register("bot", _adapter(tmp_path / "a2", "2"), base_model="base")
    reg.promote("bot:v1")
    (tmp_path / "registry" / "bot" / "aliases" / "_default" / "00000001.json").write_text('{"vers')
    with pytest.raises(RegistryError, match="bot has an unreadable file; promote it again"):
        reg.resolve("bot")
    assert [e.model_id for e in reg.list()] == ["bot:v1", "bot:v2"]  # versions are unaffected


def test_an_alias_written_as_one_file_by_an_older_release_is_read_and_continued(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    for i in (1, 2, 3):
        reg.register("bot", _adapter(tmp_path / f"a{i}", str(i)), base_model="base")
    legacy = tmp_path / "registry" / "bot" / "aliases" / "stable.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"version": 2, "history": [{"version": 1, "at": 1.0}], "updated_at": 2.0}))
    assert reg.resolve("bot:stable").version == 2
    assert [a.model_id for a in reg.aliases("bot")] == ["bot:stable"]
    reg.promote("bot:v3", alias="stable")
    assert [h["version"] for h in reg.aliases("bot")[0].history] == [1, 2]
    assert reg.rollback("bot", "stable")[0].version == 2 and reg.rollback("bot", "stable")[0].version == 1


def _mover(root: str, worker: int, moves: int, out) -> None:
    """One of several processes moving one alias at once: promotes to a version of its own, or rolls back."""
    reg = Registry(root)
    done = []
    for i in range(moves):
        if i % 3 == 2:
            try:
                alias, before = reg.rollback("bot", "stable")
            except RegistryError:
                continue  # nothing to roll back to at that moment
            done.append(("rollback", before, alias.version))
        else:
            version = 1 + (worker * moves + i) % 4
            alias, before = reg.promote(f"bot:v{version}", alias="stable")
            if before != alias.version:
                done.append(("promote", before, alias.version))
    out.put(done)


@pytest.mark.parametrize(("where", "workers", "moves"), [("local", 6, 15), ("s3", 4, 6)])
def test_concurrent_promotes_and_rollbacks_from_several_processes_lose_no_move(
    where, workers, moves, tmp_path, request
):
    import multiprocessing as mp

    root = str(tmp_path / "registry") if where == "local" else request.getfixturevalue("s3_server")("aliases")
    reg = Registry(root)
    for i in range(1, 5):
        reg.register("bot", _adapter(tmp_path / f"a{i}", str(i)), base_model="base")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_mover, args=(root, w, moves, out)) for w in range(workers)]
    for p in procs:
        p.start()
    done = [m for _ in procs for m in out.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # Every record is one move, each applied to the record before it: promote appends the old target to the
    # history, rollback pops it; so replaying the records one by one must give each next one.
    files = storage.list_files(storage.join(reg.root, "bot", "aliases", "stable"))
    numbers = [int(f.rsplit("/", 1)[-1].removesuffix(".json")) for f in files]
    records = [json.loads(storage.read_text(f)) for f in files]
    assert numbers[-1] == len(done)  # one record per move reported as done: none lost, none doubled
    assert numbers == list(range(numbers[-1] - len(records) + 1, numbers[-1] + 1))  # contiguous (older pruned)
    for before, after in zip(records, records[1:], strict=False):
        old, new = [h["version"] for h in before["history"]], [h["version"] for h in after["history"]]
        promoted = new == [*old, before["version"]][-50:]
        rolled_back = new == old[:-1] and after["version"] == old[-1]
        assert promoted or rolled_back, (before, after)
    assert reg.resolve("bot:stable").version == records[-1]["version"]


def test_cli_promote_rollback_and_registry_listing(tmp_path, capsys):
    root = tmp_path / "registry"
    reg = Registry(str(root))
    for i in (1, 2):
        reg.register("bot", _adapter(tmp_path / f"a{i}", str(i)), base_model="base")
    common = [f"registry_dir={root}"]
    assert main(["promote", "bot:v1", *common]) == 0
    assert main(["promote", "bot:v2", *common]) == 0
    assert main(["promote", "bot:v1", "--alias", "stable", *common]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["[promote] bot -> bot:v1 (was unset (latest))", "[promote] bot -> bot:v2 (was v1)",
                   "[promote] bot:stable -> bot:v1 (was unset (latest))"]  # fmt: skip
    assert main(["rollback", "bot", *common]) == 0
    assert capsys.readouterr().out.strip() == "[rollback] bot -> bot:v1 (was v2)"
    assert main(["registry", *common]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["model", "kind"] and table[1].startswith("bot:v1")
    assert table[-2:] == ["alias bot -> bot:v1 (before: -)", "alias bot:stable -> bot:v1 (before: -)"]
    assert main(["registry", "--json", *common]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r for r in rows if "alias" in r] == [
        {"alias": "bot", "target": "bot:v1", "previous": [], "weights": None},
        {"alias": "bot:stable", "target": "bot:v1", "previous": [], "weights": None},
    ]
    assert main(["promote", "bot:v7", *common]) == 1
    assert "model 'bot' has no version 7 (have [1, 2])" in capsys.readouterr().err

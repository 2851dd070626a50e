"""Base models named by hub id: resolved once on the driver (a commit, a local snapshot), loaded by every worker
from that snapshot, recorded in stats, registry and fingerprints; clear one-line errors offline and for gated
models. Nothing here reaches the real hub: a Hugging Face cache is built in the test from the project's tiny model
(the hub's own layout), a fake hub on 127.0.0.1 answers the error paths, and another one serves the tiny model
through the hub's own endpoints for the download itself."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import pytest
from helpers import free_port

from aigc.config import ModelConfig, load_config
from aigc.errors import ConfigError, DataError, ModelUnavailableError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "tiny-base"
REPO = "aigc-test/tiny-chat"  # no such repository on the hub: a worker handed this id instead of a path fails
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_sentinelTokenNeverWritten0123456789"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json")


def make_hub_cache(cache: Path, repo: str, commit: str, files: tuple[str, ...] | None = None) -> Path:
    """The tiny model as ``snapshot_download`` leaves it: ``models--org--name/snapshots/<commit>/`` and
    ``refs/main`` naming the commit (``files``: only these, e.g. a tokenizer-only copy)."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in TINY.iterdir():
        if files is None or f.name in files:
            shutil.copy(f, snapshot / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf-cache")
    make_hub_cache(cache, REPO, COMMIT)
    make_hub_cache(cache, "aigc-test/tokenizer-only", COMMIT, TOKENIZER_FILES)
    return cache


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this process (huggingface_hub reads the variable once, at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def ray_tmp():
    """An empty directory for RAY_TMPDIR: a Ray start leaves its session there (a short path: Ray's sockets
    live in it, and a socket path may not exceed 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="aigc-ray-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _hermetic_env(tmp_path: Path, ray_tmp: Path, **extra: str) -> dict[str, str]:
    """A CLI's environment with no token, an empty Hugging Face home, its own Ray temp dir and no cluster to join."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), RAY_TMPDIR=str(ray_tmp), RAY_ADDRESS="", **extra)
    return env


def _data(tmp_path: Path, rows: int = 60) -> Path:
    from aigc.demo.dataset import generate_support_examples

    src = tmp_path / "support.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in generate_support_examples(rows, seed=3)))
    return src


def _cli(env: dict[str, str], *args: str, timeout: int = 60) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "aigc.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)  # fmt: skip
    return proc, time.monotonic() - t0


def _small_run(src: Path, out: Path, registry: Path) -> list[str]:
    """Overrides of configs/demo.yaml for a short run on 2 CPUs: one tokenizer actor, one Train worker, one epoch."""
    return [f"data.path={src}", f"output_dir={out}", f"registry_dir={registry}", "data.tokenizer_actors=1",
            "train.num_workers=1", "train.epochs=1", "train.batch_size=16", "train.eval_generation_samples=0",
            "train.adapter_name=hub-bot", "cluster.num_cpus=2"]  # fmt: skip


def _files_under(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in d.rglob("*") if p.is_file()]


@contextlib.contextmanager
def _serving(handler: type[BaseHTTPRequestHandler], **attrs: object) -> Iterator[str]:
    """``handler`` on a free port of 127.0.0.1 until the block ends (``attrs`` set on its server); yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for name, value in attrs.items():
        setattr(server, name, value)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# 1. resolving on the driver
def test_a_cached_hub_id_resolves_offline_to_its_commit_and_keeps_its_name(hub_cache, offline):
    from aigc.models.hub import resolve_model
    from aigc.models.loading import load_tokenizer, model_id_for

    m = resolve_model(ModelConfig(name_or_path=REPO, cache_dir=str(hub_cache)), weights=True)
    snapshot = hub_cache / "models--aigc-test--tiny-chat" / "snapshots" / COMMIT
    assert (m.commit, m.resolved_path, m.load_path()) == (COMMIT, str(snapshot), str(snapshot))
    assert m.name_or_path == REPO and model_id_for(m.load_path()) == REPO  # clients still see the hub id
    assert resolve_model(m, weights=True) is m  # resolved once: a second call is a no-op
    assert load_tokenizer(m.load_path()).pad_token is not None
    pinned = resolve_model(ModelConfig(name_or_path=REPO, cache_dir=str(hub_cache), revision=COMMIT), weights=True)
    assert pinned.resolved_path == m.resolved_path


def test_a_tokenizer_only_copy_serves_preprocessing_but_not_training(hub_cache, offline):
    from aigc.models.hub import resolve_model

    cfg = ModelConfig(name_or_path="aigc-test/tokenizer-only", cache_dir=str(hub_cache))
    assert resolve_model(cfg, weights=False).commit == COMMIT
    with pytest.raises(ModelUnavailableError) as err:
        resolve_model(cfg, weights=True)
    msg = str(err.value)
    assert f"aigc-test/tokenizer-only@{COMMIT}" in msg and "no weights" in msg and "\n" not in msg


def test_an_uncached_revision_or_model_offline_is_one_line_with_both_ways_out(hub_cache, offline):
    from aigc.models.hub import resolve_model

    for cfg in (ModelConfig(name_or_path=REPO, cache_dir=str(hub_cache), revision="v2"),
                ModelConfig(name_or_path="aigc-test/elsewhere", cache_dir=str(hub_cache))):  # fmt: skip
        with pytest.raises(ModelUnavailableError) as err:
            resolve_model(cfg, weights=False)
        msg = str(err.value)
        assert f"{cfg.name_or_path}@{cfg.revision or 'main'} is not in the Hugging Face cache {hub_cache}" in msg
        assert "HF_HUB_OFFLINE=1" in msg and "model.name_or_path=/path/to/a/local/copy" in msg and "\n" not in msg


def test_a_local_directory_passes_through_without_a_commit(tmp_path):
    from aigc.models.hub import resolve_model

    m = resolve_model(ModelConfig(name_or_path=str(TINY)), weights=True)
    assert (m.resolved_path, m.commit) == (str(TINY), None)
    # a directory inside a hub cache carries its commit in its name
    snapshot = make_hub_cache(tmp_path / "cache", REPO, COMMIT)
    assert resolve_model(ModelConfig(name_or_path=str(snapshot)), weights=True).commit == COMMIT
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(TINY / name, partial / name)
    assert resolve_model(ModelConfig(name_or_path=str(partial)), weights=False).resolved_path == str(partial)
    with pytest.raises(ModelUnavailableError, match=r"partial: no weights \(model\*\.safetensors"):
        resolve_model(ModelConfig(name_or_path=str(partial)), weights=True)
    with pytest.raises(ConfigError, match="model.revision: 'main' is for a hub id"):
        resolve_model(ModelConfig(name_or_path=str(TINY), revision="main"), weights=False)


def test_data_tokenized_at_another_commit_is_refused_before_training():
    from aigc.data.preprocess import check_tokenized_for

    model = ModelConfig(name_or_path=REPO, commit="b" * 40)
    check_tokenized_for({"tokenizer": REPO, "model_commit": "b" * 40}, model, "/runs/x")
    check_tokenized_for({"tokenizer": REPO}, model, "/runs/x")  # data from before commits were recorded
    with pytest.raises(DataError) as err:
        check_tokenized_for({"tokenizer": REPO, "model_commit": COMMIT}, model, "/runs/x")
    assert f"at commit {COMMIT}, but it resolves to {'b' * 40} now: set model.revision={COMMIT}" in str(err.value)


def test_fingerprints_follow_the_commit_not_where_the_snapshot_sits(tmp_path):
    from aigc.data.preprocess import _fingerprint
    from aigc.pipeline.fingerprint import fingerprint
    from aigc.pipeline.stages import build_stages

    def prints(*overrides: str) -> dict[str, str]:
        cfg = load_config(ROOT / "configs" / "demo.yaml", [f"output_dir={tmp_path}", f"model.name_or_path={REPO}",
                                                           *overrides])  # fmt: skip
        done = {"sweep": {"values": {"train.lr": 0.004}, "sweep_id": "s"}, "deploy": {"base_url": "u"}}
        out: dict[str, str] = {}
        for s in build_stages(cfg, hash_data=lambda _: "data"):
            out[s.name] = fingerprint(s.inputs(done), out[s.upstream] if s.upstream else None)
        return out

    base = prints(f"model.commit={COMMIT}", "model.resolved_path=/a/snapshot", "model.cache_dir=/a")
    moved = prints(f"model.commit={'b' * 40}", "model.resolved_path=/a/snapshot", "model.cache_dir=/a")
    elsewhere = prints(f"model.commit={COMMIT}", "model.resolved_path=/b/snapshot", "model.cache_dir=/b")
    assert {k for k in base if base[k] != moved[k]} == set(base)  # every stage reads the model
    assert elsewhere == base
    data = load_config(None, []).data
    assert _fingerprint([], data, ModelConfig(name_or_path=REPO, commit=COMMIT)) != _fingerprint(
        [], data, ModelConfig(name_or_path=REPO, commit="b" * 40))  # fmt: skip


# 2. the CLI: errors before any Ray work, one line each
def test_an_uncached_hub_id_offline_fails_in_one_line_before_ray_starts(tmp_path, ray_tmp):
    env = _hermetic_env(tmp_path, ray_tmp, HF_HUB_OFFLINE="1", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    proc, elapsed = _cli(env, "preprocess", "--config", "configs/qwen2.5-0.5b-lora.yaml",
                         f"data.path={_data(tmp_path)}", f"output_dir={tmp_path / 'out'}")  # fmt: skip
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith("aigc preprocess: Qwen/Qwen2.5-0.5B-Instruct@main is not in the Hugging Face cache ")
    assert "HF_HUB_OFFLINE=1" in lines[0] and "model.name_or_path=/path/to/a/local/copy" in lines[0]
    assert elapsed < 5, elapsed
    assert not list(ray_tmp.iterdir())  # no Ray session was started


class _FakeHub(BaseHTTPRequestHandler):
    """Answers every request with the status and hub error code the test set, and records the paths asked."""

    answer: tuple[int, str] = (401, "GatedRepo")
    paths: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.paths.append(self.path)
        status, code = self.answer
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_hub():
    _FakeHub.paths = []
    with _serving(_FakeHub) as url:
        yield url


@pytest.mark.parametrize(
    ("answer", "revision", "expected"),
    [
        ((401, "GatedRepo"), None, "aigc-test/gated is gated: accept its terms at {hub}/aigc-test/gated, then set "
                                   "HF_TOKEN to a token of that account"),
        ((401, "RepoNotFound"), None, "aigc-test/gated: no such model on the hub at {hub}, or it is private and "
                                      "needs a token: set HF_TOKEN"),
        ((404, "RevisionNotFound"), "v9", "model.revision 'v9': aigc-test/gated has no such branch, tag or commit"),
    ],
)  # fmt: skip
def test_hub_refusals_are_one_line_naming_the_way_out(tmp_path, ray_tmp, fake_hub, answer, revision, expected):
    _FakeHub.answer = answer
    env = _hermetic_env(tmp_path, ray_tmp, HF_ENDPOINT=fake_hub)
    extra = [f"model.revision={revision}"] if revision else []
    proc, elapsed = _cli(env, "preprocess", "--config", "configs/demo.yaml",
                         "model.name_or_path=aigc-test/gated", f"data.path={_data(tmp_path)}",
                         f"output_dir={tmp_path / 'out'}", *extra)  # fmt: skip
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"aigc preprocess: {expected.format(hub=fake_hub)}"), lines[0]
    # asked once, on the driver (huggingface_hub also fetches its own /api/agent-harnesses list)
    assert [p for p in _FakeHub.paths if p.startswith("/api/models/")] == [
        f"/api/models/aigc-test/gated/revision/{revision or 'main'}"]  # fmt: skip
    assert elapsed < 5 and not list(ray_tmp.iterdir())


# 3. shared storage: the driver uploads the snapshot, another node copies it instead of asking the hub
def test_a_shared_cache_on_s3_is_copied_to_a_node_that_lacks_the_snapshot(s3_server, hub_cache, tmp_path,
                                                                         offline, monkeypatch):  # fmt: skip
    from huggingface_hub import constants

    from aigc.models.hub import local_model_dir, resolve_model
    from aigc.models.loading import load_tokenizer, model_id_for

    shared = s3_server("models")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))  # the driver's own cache holds the model
    m = resolve_model(ModelConfig(name_or_path=REPO, cache_dir=shared), weights=True)
    assert m.commit == COMMIT
    assert m.resolved_path == f"{shared}/models--aigc-test--tiny-chat/snapshots/{COMMIT}"
    node_cache = tmp_path / "node-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(node_cache))  # another node: an empty cache
    local = local_model_dir(m.load_path(), weights=True)
    assert local == str(node_cache / "models--aigc-test--tiny-chat" / "snapshots" / COMMIT)
    assert sorted(os.listdir(local)) == sorted(f.name for f in TINY.iterdir())
    assert (Path(local) / "model.safetensors").read_bytes() == (TINY / "model.safetensors").read_bytes()
    assert model_id_for(m.load_path()) == REPO and load_tokenizer(m.load_path()).eos_token


def test_a_node_without_the_snapshot_fetches_that_commit_into_its_own_cache(hub_cache, offline, monkeypatch):
    """No shared model.cache_dir: the driver's snapshot path is missing on another node, which takes the same
    commit from the hub into its own cache (here the cache already holds it: offline, no hub is asked)."""
    from huggingface_hub import constants

    from aigc.models.hub import local_model_dir

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    driver_path = f"/elsewhere/hub/models--aigc-test--tiny-chat/snapshots/{COMMIT}"
    assert local_model_dir(driver_path, weights=True) == str(hub_cache / "models--aigc-test--tiny-chat" / "snapshots"
                                                             / COMMIT)  # fmt: skip
    missing = f"/elsewhere/hub/models--aigc-test--tiny-chat/snapshots/{'c' * 40}"
    with pytest.raises(ModelUnavailableError, match=f"aigc-test/tiny-chat@{'c' * 40} is not in the Hugging Face"):
        local_model_dir(missing, weights=True)
    with pytest.raises(ModelUnavailableError, match="/elsewhere/my-model is not on node .*model.cache_dir"):
        local_model_dir("/elsewhere/my-model", weights=False)


# 4. end to end: `aigc pipeline` (preprocess -> train -> register) on a hub id, offline, in its own Ray cluster
@pytest.mark.integration
def test_a_hub_id_is_tokenized_and_trained_from_its_snapshot_and_its_commit_recorded(tmp_path, ray_tmp):
    """The hub id resolves from a cache only the driver is told about (``model.cache_dir``): the workers' own
    Hugging Face home is empty, the hub is offline and its endpoint a closed port, so a tokenizer actor or a
    Train worker handed the hub id instead of the snapshot path would fail the run."""
    from aigc.pipeline.fingerprint import data_hash, fingerprint
    from aigc.pipeline.stages import build_stages

    cache = tmp_path / "hf-cache"
    make_hub_cache(cache, REPO, COMMIT)
    src, out, registry = _data(tmp_path), tmp_path / "out", tmp_path / "registry"
    overrides = [f"model.name_or_path={REPO}", f"model.cache_dir={cache}", "pipeline.sweep=false",
                 "pipeline.promote=false", "pipeline.deploy=false", *_small_run(src, out, registry)]  # fmt: skip
    env = _hermetic_env(tmp_path, ray_tmp, HF_HUB_OFFLINE="1", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",
                        HF_TOKEN=TOKEN)  # fmt: skip
    proc, _ = _cli(env, "pipeline", "--config", "configs/demo.yaml", *overrides, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    snapshot = cache / "models--aigc-test--tiny-chat" / "snapshots" / COMMIT
    assert proc.stdout.count(f"[model] {REPO}@main -> commit {COMMIT} in {snapshot}\n") == 1  # resolved once

    stats = json.loads((out / "data" / "stats.json").read_text())
    assert (stats["tokenizer"], stats["model_commit"]) == (REPO, COMMIT)
    meta = json.loads((registry / "hub-bot" / "v1" / "meta.json").read_text())
    assert (meta["base_model"], meta["base_model_commit"], meta["config"]["model"]["commit"]) == (REPO, COMMIT, COMMIT)
    # the pipeline's preprocess fingerprint is that of the config with the commit (and not without it)
    state = json.loads((out / "pipeline" / "state.json").read_text())["stages"]
    content = data_hash([{"source": 0, "sha256": hashlib.sha256(src.read_bytes()).hexdigest()}])
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    for commit, same in ((COMMIT, True), (None, False)):
        resolved = cfg.model_copy(update={"model": cfg.model.model_copy(update={"commit": commit})})
        inputs = build_stages(resolved, hash_data=lambda _: content)[0].inputs({})
        assert (state["preprocess"]["fingerprint"] == fingerprint(inputs)) is same
    # the token reached no file the run wrote: data, shards, checkpoints, MLflow, TensorBoard, state, registry
    written = _files_under(out, registry)
    assert len(written) > 20 and any("mlruns" in p.parts for p in written)
    assert not [p for p in written if TOKEN.encode() in p.read_bytes()]


# 5. online: a hub id that is not cached yet, downloaded from a hub (one on 127.0.0.1 speaking the hub's protocol)
class _Request(NamedTuple):
    where: str  # "hub" or "cdn"
    method: str
    path: str  # without the query
    auth: str | None  # the Authorization header
    served: str | None  # the file whose content the answer carried


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _HubRepo:
    """One private model repository at one commit, as huggingface.co serves it (to ``Bearer <token>`` only): repo
    info, the recursive tree, and ``/resolve/`` answering HEAD and GET; its LFS files (the weights) are a redirect
    to a CDN on another origin, as on the hub. Every request is logged, in order."""

    def __init__(self, repo_id: str, commit: str, src: Path, token: str):
        self.repo_id, self.commit, self.token, self.cdn = repo_id, commit, token, ""
        self.files = {p.name: p.read_bytes() for p in sorted(src.iterdir())}
        self.lfs = {name: hashlib.sha256(data).hexdigest() for name, data in self.files.items()
                    if name.endswith(".safetensors")}  # fmt: skip
        self.requests: list[_Request] = []

    def tree(self) -> list[dict]:
        entries = []
        for name, data in self.files.items():
            entry = {"type": "file", "path": name, "size": len(data), "oid": _git_blob_id(data)}
            if name in self.lfs:
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.lfs[name]}\nsize {len(data)}\n"
                entry["oid"] = _git_blob_id(pointer.encode())
                entry["lfs"] = {"oid": self.lfs[name], "size": len(data), "pointerSize": len(pointer)}
            entries.append(entry)
        return entries


class _RepoHandler(BaseHTTPRequestHandler):
    """The hub (``where = "hub"``) or its CDN (``"cdn"``) for ``server.repo`` (see :class:`_HubRepo`)."""

    where = "hub"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        repo: _HubRepo = self.server.repo  # type: ignore[attr-defined]
        path = urlsplit(self.path).path
        if path == "/api/agent-harnesses":  # huggingface_hub's own look-up, nothing to do with the model
            return self._send(404, json.dumps({"error": "not here"}).encode())
        auth = self.headers.get("Authorization")
        status, body, headers, served = self._answer(repo, path, auth)
        repo.requests.append(_Request(self.where, self.command, path, auth, served if self.command == "GET" else None))
        self._send(status, body, headers)

    do_HEAD = do_GET

    def _answer(self, repo: _HubRepo, path: str, auth: str | None) -> tuple[int, bytes, dict[str, str], str | None]:
        def error(status: int, code: str) -> tuple[int, bytes, dict[str, str], None]:
            return status, json.dumps({"error": code}).encode(), {"X-Error-Code": code}, None

        if self.where == "cdn":  # a signed URL: no token wanted (the test checks none is sent)
            name = next((n for n, sha in repo.lfs.items() if path == f"/lfs/{sha}"), None)
            return (200, repo.files[name], {}, name) if name else error(404, "EntryNotFound")
        if auth != f"Bearer {repo.token}":  # a private repository, to anyone else: not found
            return error(401, "RepoNotFound")
        revisions = ("main", repo.commit)
        if path in [f"/api/models/{repo.repo_id}/revision/{r}" for r in revisions]:
            info = {"id": repo.repo_id, "sha": repo.commit, "private": True,
                    "siblings": [{"rfilename": name} for name in repo.files]}  # fmt: skip
            return 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, None
        if path in [f"/api/models/{repo.repo_id}/tree/{r}" for r in revisions]:
            return 200, json.dumps(repo.tree()).encode(), {"Content-Type": "application/json"}, None
        if any(path.startswith(f"/api/models/{repo.repo_id}/tree/{r}/") for r in revisions):
            return error(404, "EntryNotFound")  # a folder: the repository has none
        prefix, _, name = path.rpartition("/")
        if prefix not in [f"/{repo.repo_id}/resolve/{r}" for r in revisions]:
            return error(404, "RepoNotFound" if path.startswith("/api/") else "EntryNotFound")
        if name not in repo.files:
            return error(404, "EntryNotFound")
        data, headers = repo.files[name], {"X-Repo-Commit": repo.commit}
        if name in repo.lfs:  # the hub's answer for an LFS file: where it is, its sha256 and its size
            sha = repo.lfs[name]
            headers.update({"Location": f"{repo.cdn}/lfs/{sha}", "X-Linked-Etag": f'"{sha}"',
                            "X-Linked-Size": str(len(data))})  # fmt: skip
            return 302, b"", headers, None
        return 200, data, {**headers, "ETag": f'"{_git_blob_id(data)}"'}, name

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))  # a HEAD's too: the size of what a GET would send
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _CdnHandler(_RepoHandler):
    where = "cdn"


@pytest.mark.integration
def test_an_uncached_hub_id_is_downloaded_once_on_the_driver_tokenizer_first_weights_for_training(tmp_path, ray_tmp):
    """``aigc preprocess`` then ``aigc train`` on a hub id that no cache holds yet, from a hub on 127.0.0.1 that
    serves the tiny model to the token only: each command resolves ``main`` once, on the driver; preprocessing
    downloads the tokenizer and config files, training adds the weights at the same commit, and no file is
    served twice (a tokenizer actor or Train worker handed the hub id instead of the snapshot would ask again)."""
    repo_id, commit = "aigc-test/tiny", "fedcba9876543210fedcba9876543210fedcba98"
    repo = _HubRepo(repo_id, commit, TINY, TOKEN)
    src, out, registry, hf_home = _data(tmp_path), tmp_path / "out", tmp_path / "registry", tmp_path / "hf-home"
    overrides = ["--config", "configs/demo.yaml", f"model.name_or_path={repo_id}", *_small_run(src, out, registry)]
    with _serving(_CdnHandler, repo=repo) as cdn, _serving(_RepoHandler, repo=repo) as hub:
        repo.cdn = cdn
        env = _hermetic_env(tmp_path, ray_tmp, HF_ENDPOINT=hub, HF_TOKEN=TOKEN)
        pre, _ = _cli(env, "preprocess", *overrides, timeout=300)
        assert pre.returncode == 0, (pre.stdout + pre.stderr)[-5000:]
        first = len(repo.requests)
        train, _ = _cli(env, "train", *overrides, timeout=300)
        assert train.returncode == 0, (train.stdout + train.stderr)[-5000:]

    snapshot = hf_home / "hub" / "models--aigc-test--tiny" / "snapshots" / commit
    for proc in (pre, train):  # resolved once per command, on the driver
        assert proc.stdout.count(f"[model] {repo_id}@main -> commit {commit} in {snapshot}\n") == 1, proc.stdout
    by_command = (repo.requests[:first], repo.requests[first:])
    for requests in by_command:
        assert [r.path for r in requests if "/revision/" in r.path] == [f"/api/models/{repo_id}/revision/main"]
    # each file served once across both commands: the tokenizer and config files to preprocessing, the weights
    # (from the CDN) to training; the README matches no pattern and is never fetched
    served = [r.served for r in repo.requests if r.served]
    assert len(served) == len(set(served)), served
    tokenizer = {"chat_template.jinja", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"}  # fmt: skip
    assert ({r.served for r in by_command[0] if r.served}, [r.served for r in by_command[1] if r.served]) == (
        tokenizer, ["model.safetensors"])  # fmt: skip
    heads = [r.path.rpartition("/")[2] for r in repo.requests if r.method == "HEAD"]
    assert sorted(heads) == sorted([*tokenizer, "model.safetensors"])  # one metadata call per file, no more
    resolves = [r.path for r in repo.requests if "/resolve/" in r.path]
    assert resolves and all(p.startswith(f"/{repo_id}/resolve/{commit}/") for p in resolves)  # pinned to the commit
    assert sorted(os.listdir(snapshot)) == sorted([*tokenizer, "model.safetensors"])
    assert all((snapshot / name).read_bytes() == repo.files[name] for name in os.listdir(snapshot))
    # the token went to the hub with every request, and not to the CDN
    assert {r.auth for r in repo.requests if r.where == "hub"} == {f"Bearer {TOKEN}"}
    assert [(r.auth, r.served) for r in repo.requests if r.where == "cdn"] == [(None, "model.safetensors")]

    stats = json.loads((out / "data" / "stats.json").read_text())
    assert (stats["tokenizer"], stats["model_commit"]) == (repo_id, commit)
    meta = json.loads((registry / "hub-bot" / "v1" / "meta.json").read_text())
    assert (meta["base_model"], meta["base_model_commit"]) == (repo_id, commit)
    # the token reached no file the commands wrote: run, registry, Ray's session logs, the Hugging Face home
    written = _files_under(out, registry, ray_tmp, hf_home)
    assert any("mlruns" in p.parts for p in written) and any(p.suffix == ".log" for p in written)
    assert not [p for p in written if TOKEN.encode() in p.read_bytes()]
    assert TOKEN not in pre.stdout + pre.stderr + train.stdout + train.stderr

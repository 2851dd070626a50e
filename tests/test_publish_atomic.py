"""Atomic publishing into ``output_dir``: a publish SIGKILLed part-way never leaves a half-written export that counts
as done (locally the previous export stays whole; on S3 the tree lacks its completion marker), a finished publish
replaces the previous export completely, and registering the same weights again creates no new version."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aigc import storage
from aigc.config import load_config
from aigc.errors import StorageError
from aigc.pipeline.stages import build_stages

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"

# Publishes argv[1] to argv[2], its copy stopping for good after the first file (argv[3] says when): the parent
# SIGKILLs it there, so no handler or cleanup runs, as when a node dies. The copy is pyarrow's, under any code.
_PUBLISHER = """
import sys, time
from pathlib import Path
import pyarrow.fs as pafs
from aigc import storage

def copy_one_file_then_hang(src, dst, source_filesystem, destination_filesystem, **_):
    infos = source_filesystem.get_file_info(pafs.FileSelector(src, recursive=True))
    first = sorted(i.path for i in infos if i.type == pafs.FileType.File)[0]
    target = dst + "/" + first[len(src):].lstrip("/")
    destination_filesystem.create_dir(target.rpartition("/")[0], recursive=True)
    with source_filesystem.open_input_stream(first) as r, destination_filesystem.open_output_stream(target) as w:
        w.write(r.read())
    Path(sys.argv[3]).write_text("one file copied")
    time.sleep(600)

pafs.copy_files = copy_one_file_then_hang
storage.replace_dir(sys.argv[1], sys.argv[2])
"""


def _adapter(path: Path, weights: bytes) -> Path:
    """A small PEFT-shaped directory (its bytes are what is compared, not loaded)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (path / "adapter_model.safetensors").write_bytes(weights)
    (path / "tokenizer_config.json").write_text("{}")
    return path


def _tree(path: str) -> dict[str, bytes]:
    """Relative name -> bytes of every file under ``path`` (local or URI)."""
    return {f[len(path) :].lstrip("/"): storage.read_bytes(f) for f in storage.list_files(path)}


def _kill_mid_publish(src: Path, dest: str, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(src), dest, str(ready)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, f"the publisher exited early ({proc.returncode})"
            assert time.monotonic() < deadline, "the publisher never started copying"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _train_done(output_dir: str, model_dir: str) -> bool:
    """The pipeline's own check that the train stage's output is there."""
    cfg = load_config(DEMO, [f"output_dir={output_dir}", "pipeline.deploy=false", "pipeline.sweep=false"])
    train = next(s for s in build_stages(cfg, lambda _: "h") if s.name == "train")
    return train.exists({"model_dir": model_dir, "metrics": {}})


def test_a_local_publish_killed_mid_copy_leaves_the_previous_export_whole(tmp_path):
    out = tmp_path / "out"
    dest = str(out / "adapter")
    storage.replace_dir(str(_adapter(tmp_path / "v1", b"old weights" * 1000)), dest)
    before = _tree(dest)
    new = _adapter(tmp_path / "v2", b"new weights" * 1000)

    _kill_mid_publish(new, dest, tmp_path)
    assert _tree(dest) == before  # same files, same bytes
    assert _train_done(str(out), dest)  # what counts as done is the whole previous export
    [leftover] = [p for p in out.iterdir() if p.name.startswith(".adapter.tmp-")]
    assert len(list(leftover.iterdir())) == 1  # the half-written copy sits aside, under a name nothing reads

    # The next publish removes the leftover and replaces the export completely.
    (Path(dest) / "only-in-v1.txt").write_text("gone after the next publish")
    storage.replace_dir(str(new), dest)
    assert _tree(dest) == _tree(str(new))
    assert sorted(p.name for p in out.iterdir()) == ["adapter"]


def test_a_kill_between_the_two_renames_is_undone_by_the_next_publish(tmp_path):
    """The previous export was renamed aside and the new one not yet in: the next publish puts it back first."""
    out = tmp_path / "out"
    dest = out / "adapter"
    storage.replace_dir(str(_adapter(tmp_path / "v1", b"old")), str(dest))
    before = _tree(str(dest))
    os.rename(dest, out / ".adapter.old-0123")
    _adapter(out / ".adapter.tmp-0123", b"new")
    assert not _train_done(str(out), str(dest))

    def broken_copy(src, dst):
        raise OSError("disk full")

    with pytest.MonkeyPatch.context() as m:
        m.setattr("aigc.storage.dirs.copy_dir", broken_copy)
        with pytest.raises(OSError, match="disk full"):
            storage.replace_dir(str(tmp_path / "v1"), str(dest))
    assert _tree(str(dest)) == before and sorted(p.name for p in out.iterdir()) == ["adapter"]


def test_an_s3_publish_killed_mid_copy_does_not_count_until_a_publish_completes(s3_server, tmp_path):
    out = s3_server("run")
    dest = storage.join(out, "adapter")
    storage.replace_dir(str(_adapter(tmp_path / "v1", b"old weights" * 1000)), dest)
    assert _train_done(out, dest) and storage.is_complete(dest)
    new = _adapter(tmp_path / "v2", b"new weights" * 1000)

    _kill_mid_publish(new, dest, tmp_path)
    assert len(storage.list_files(dest)) == 1  # half-written: one file of three
    assert not storage.is_complete(dest) and not _train_done(out, dest)
    cfg = load_config(DEMO, [f"output_dir={out}", f"registry_dir={tmp_path / 'reg'}"])
    from aigc.train.publish import register_model

    with pytest.raises(StorageError, match=r"adapter is not a complete export \(no .*\.adapter\.complete"):
        register_model(cfg, dest, {}, {}, None)

    storage.replace_dir(str(new), dest)
    assert _tree(dest) == _tree(str(new)) and _train_done(out, dest)


def test_publish_replaces_the_export_whole_through_replace_dir(tmp_path, monkeypatch):
    """``publish`` (training and sweeps) goes through :func:`aigc.storage.replace_dir`, and registers once."""
    from aigc.train import publish as pub
    from aigc.train.checkpointing import ADAPTER_SUBDIR, HISTORY_FILE

    ckpt_dir = tmp_path / "ckpt"
    _adapter(ckpt_dir / ADAPTER_SUBDIR, b"trained")
    (ckpt_dir / HISTORY_FILE).write_text(json.dumps([{"epoch": 1, "eval_loss": 1.25}]))

    class Checkpoint:
        def to_directory(self, path: str) -> str:
            return shutil.copytree(ckpt_dir, path)

    class Tokenizer:
        def save_pretrained(self, path: str) -> None:
            Path(path, "tokenizer_config.json").write_text('{"saved": true}')

    calls, real = [], storage.replace_dir
    monkeypatch.setattr(pub.storage, "replace_dir", lambda *a: calls.append(a) or real(*a))
    cfg = load_config(DEMO, [f"output_dir={tmp_path / 'out'}", f"registry_dir={tmp_path / 'reg'}"])
    dest = str(tmp_path / "out" / "adapter")
    _adapter(Path(dest), b"previous run")
    (Path(dest) / "stale.bin").write_bytes(b"from an older export")
    res = pub.publish(cfg, Checkpoint(), dest, tokenizer=Tokenizer())
    assert [c[1] for c in calls] == [dest]
    assert sorted(_tree(dest)) == ["adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"]
    assert _tree(dest)["adapter_model.safetensors"] == b"trained" and res.metrics == {"epoch": 1, "eval_loss": 1.25}
    assert res.registry_id == f"{cfg.train.adapter_name}:v1"


def test_a_kill_between_registering_and_recording_it_registers_no_new_version(tmp_path):
    """The register stage ran (the version exists) but the pipeline died before recording it: the re-run
    registers the same export again and gets the same version back."""
    from aigc.registry import Registry

    cfg = load_config(DEMO, [f"output_dir={tmp_path / 'out'}", f"registry_dir={tmp_path / 'reg'}",
                             "pipeline.deploy=false"])  # fmt: skip
    model_dir = str(tmp_path / "out" / "adapter")
    storage.replace_dir(str(_adapter(tmp_path / "v1", b"weights")), model_dir)
    register = next(s for s in build_stages(cfg, lambda _: "h") if s.name == "register")
    done = {"train": {"model_dir": model_dir, "metrics": {"eval_loss": 1.5}}, "preprocess": {"data_hash": "d" * 16}}
    first = register.run(done)
    again = register.run(done)  # no state.json records the first: the runner would run the stage again
    assert first == again == {"registry_id": f"{cfg.train.adapter_name}:v1"}
    assert Registry(cfg.registry_dir).versions(cfg.train.adapter_name) == [1]

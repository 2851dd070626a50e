"""Local writes under faults: a failed or killed write leaves the previous content readable, never a torn file."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aigc import storage


def _full_disk(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fault_at", ["write", "fsync", "replace"])
def test_a_write_that_fails_at_any_point_leaves_the_old_content_and_no_temporary_file(tmp_path, monkeypatch, fault_at):
    path = tmp_path / "state.json"
    storage.write_json(str(path), {"step": 1})
    if fault_at == "write":
        real_open = open

        def full_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if "w" in mode:
                f.write = _full_disk
            return f

        monkeypatch.setattr("builtins.open", full_open)
    else:
        monkeypatch.setattr(os, fault_at, _full_disk)
    with pytest.raises(OSError, match="No space left"):
        storage.write_json(str(path), {"step": 2})
    monkeypatch.undo()
    assert storage.read_json(str(path)) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_create_exclusive_never_shows_a_half_written_file_and_refuses_a_second_creator(tmp_path, monkeypatch):
    path = str(tmp_path / "claims" / "v1")
    seen = []
    real_link = os.link

    def link_and_look(src, dst):  # the moment the name appears, the content must already be there
        real_link(src, dst)
        seen.append(Path(dst).read_bytes())

    monkeypatch.setattr(os, "link", link_and_look)
    assert storage.create_exclusive(path, b"owner-a") is True
    assert storage.create_exclusive(path, b"owner-b") is False
    assert seen == [b"owner-a"] and Path(path).read_bytes() == b"owner-a"
    assert sorted(os.listdir(tmp_path / "claims")) == ["v1"]  # no temporary files left by either call


_WRITER = """
import sys
sys.path.insert(0, sys.argv[2])
from aigc import storage
i = 0
print("ready", flush=True)
while True:
    i += 1
    storage.write_text(sys.argv[1], str(i) * 200_000)  # 200 kB+ per write: the kill lands mid-write often
"""


def test_a_writer_sigkilled_mid_write_leaves_a_whole_file(tmp_path):
    path = tmp_path / "big.txt"
    platform_dir = os.path.join(os.path.dirname(__file__), "..", "platform")
    for delay in (0.3, 0.45, 0.6):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), platform_dir], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        text = path.read_text()
        assert text and len(text) % 200_000 == 0 and text == text[: len(text) // 200_000] * 200_000, "torn file"

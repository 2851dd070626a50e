"""One pipeline per output_dir: the lock's holder record, release, a second process refused naming the first, a
SIGKILLed holder's lock taken over, and ``aigc pipeline`` stopping on a held lock before any Ray work."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from aigc.errors import LockHeldError
from aigc.pipeline import lock
from aigc.pipeline.lock import acquire, lock_path, pipeline_lock, release

ROOT = Path(__file__).resolve().parents[1]
_ENV = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}

# Takes the lock through the pipeline's own function (as its first step), says so, and holds it until killed.
_HOLD = """
import sys, time
from aigc.pipeline.lock import acquire
acquire(sys.argv[1], command="holder " + sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""
# Tries to take the lock once; prints the outcome on one line.
_TRY = """
import sys
from aigc.errors import LockHeldError
from aigc.pipeline.lock import pipeline_lock
try:
    with pipeline_lock(sys.argv[1], command="second"):
        print("got it", flush=True)
except LockHeldError as exc:
    print(f"refused: {exc}", flush=True)
    sys.exit(3)
"""


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=_ENV)
    assert proc.stdout.readline().strip() == "held", "the holder should have taken the lock"
    return proc


def _try(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _TRY, str(out)], capture_output=True, text=True, env=_ENV,
                          timeout=60)  # fmt: skip


def test_the_lock_records_its_holder_and_is_released_on_error(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="a stage failed"), pipeline_lock(out, command="aigc pipeline x") as me:
        held = json.loads(Path(lock_path(out)).read_text())
        assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()
        assert held["command"] == "aigc pipeline x" and held["token"] == me.token
        assert time.time() - 60 < held["since"] <= time.time()
        raise RuntimeError("a stage failed")
    assert not Path(lock_path(out)).exists()
    assert lock_path(out) == str(tmp_path / "out" / "pipeline" / "lock.json")  # beside state.json


def test_a_live_holder_refuses_a_second_taker_and_keeps_its_lock(tmp_path):
    out = str(tmp_path / "out")
    me = acquire(out, command="first")
    with pytest.raises(LockHeldError) as err:
        acquire(out, command="second")
    msg = str(err.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in msg and "running `first`" in msg
    assert "Wait for it to end, or stop it" in msg
    other = replace(me, token="someone-else")
    release(out, other)  # not its lock: left alone
    assert Path(lock_path(out)).exists()
    release(out, me)
    assert not Path(lock_path(out)).exists()


def test_a_holder_on_another_host_is_never_taken_over(tmp_path):
    out = str(tmp_path / "out")
    path = Path(lock_path(out))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"host": "elsewhere-7", "pid": 1, "pid_started_at": 1.0, "since": time.time() - 90,
                                "command": "aigc pipeline", "token": "t"}))  # fmt: skip
    with pytest.raises(LockHeldError, match=rf"pid 1 on elsewhere-7.*cannot be checked.*remove {path} and run again"):
        acquire(out)


def test_a_reused_pid_does_not_keep_a_dead_holders_lock(tmp_path, capsys):
    """The pid is alive but started long after the lock was taken: another process got the dead holder's pid."""
    out = str(tmp_path / "out")
    path = Path(lock_path(out))
    path.parent.mkdir(parents=True)
    started = lock._started_at(os.getpid())
    assert started is not None, "Linux /proc gives a process's start time"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "pid_started_at": started - 3600,
                                "since": started - 3600, "command": "old", "token": "t"}))  # fmt: skip
    me = acquire(out)
    assert json.loads(path.read_text())["token"] == me.token
    assert f"took over the lock on {out} from pid {os.getpid()}" in capsys.readouterr().out


def test_two_processes_one_lock_then_a_killed_holder_is_taken_over(tmp_path):
    out = tmp_path / "out"
    first = _holder(out)
    try:
        second = _try(out)
        assert second.returncode == 3, second.stderr
        assert f"refused: another pipeline is running on {out}: pid {first.pid} on {socket.gethostname()}" in (
            second.stdout
        )
        assert f"running `holder {out}`" in second.stdout
    finally:
        first.send_signal(signal.SIGKILL)  # no finally, no release: the lock file stays behind
        first.wait()
    assert json.loads(Path(lock_path(str(out))).read_text())["pid"] == first.pid

    third = _try(out)
    assert third.returncode == 0, third.stdout + third.stderr
    lines = third.stdout.splitlines()
    assert lines[0].startswith(f"[pipeline] took over the lock on {out} from pid {first.pid} ")
    assert lines[0].endswith("that process is gone") and lines[1] == "got it"
    assert not Path(lock_path(str(out))).exists()  # released when its block ended


def test_aigc_pipeline_stops_on_a_held_lock_before_any_ray_work(tmp_path):
    """The real entry point (``aigc.cli.main``) with the demo config, in a subprocess: exit 1, the holder named
    on stderr, Ray never initialised in that process, and the holder's lock untouched."""
    out = tmp_path / "out"
    run = ("import sys, ray; from aigc.cli import main; rc = main(sys.argv[1:]); "
           "print('ray initialised' if ray.is_initialized() else 'no ray'); sys.exit(rc)")  # fmt: skip
    holder = _holder(out)
    try:
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c", run, "pipeline", "--config", "configs/demo.yaml", f"output_dir={out}",
             f"registry_dir={tmp_path / 'registry'}", "pipeline.keep_serving=false"],  # fmt: skip
            capture_output=True, text=True, env=_ENV, cwd=ROOT, timeout=300,
        )  # fmt: skip
        elapsed = time.monotonic() - t0
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"aigc pipeline: another pipeline is running on {out}: pid {holder.pid}" in proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "no ray"
        assert not (out / "pipeline" / "state.json").exists()
        assert json.loads(Path(lock_path(str(out))).read_text())["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert elapsed < 120


def test_on_s3_a_second_taker_is_refused_and_a_dead_holders_lock_is_taken_over(s3_server, capsys):
    """The same lock on an object store (moto): a conditional PUT creates it, a second taker is refused, a lock
    left by a process that has ended on this host is taken over."""
    from aigc import storage

    out = s3_server("pipe")
    me = acquire(out, command="first")
    with pytest.raises(LockHeldError, match=rf"running on {out}: pid {os.getpid()} on .*running `first`"):
        acquire(out, command="second")
    release(out, me)
    assert not storage.exists(lock_path(out))

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    storage.write_json(lock_path(out), {"host": socket.gethostname(), "pid": ended.pid, "pid_started_at": None,
                                        "since": time.time() - 5, "command": "killed", "token": "t"})  # fmt: skip
    with pipeline_lock(out) as again:
        assert storage.read_json(lock_path(out))["token"] == again.token
    assert f"from pid {ended.pid} on {socket.gethostname()}" in capsys.readouterr().out
    assert not storage.exists(lock_path(out))

"""One pipeline per output_dir at a time: ``<output_dir>/pipeline/lock.json``, beside the state it protects.

The lock is a file created atomically with :func:`aigc.storage.create_exclusive` (a hard link locally, a
conditional PUT on ``s3://``, a generation precondition on ``gs://``), so of two pipelines that start together
on one output_dir exactly one gets it. It names its holder::

    {"host": "gpu-node-3", "pid": 4242, "pid_started_at": 1767000000.1, "since": 1767000001.5,
     "command": "aigc pipeline --config configs/demo.yaml", "token": "9f1c..."}

A second pipeline stops with :class:`~aigc.errors.LockHeldError` naming that holder, before any Ray work. The
holder removes the file when it ends: done, failed or interrupted (Ctrl-C). A process killed by a signal
(SIGKILL, SIGTERM, a lost node) leaves the file behind: a later pipeline on the same host sees that the pid is
gone (or now belongs to another process) and takes the lock over, printing one line. A holder on another host
cannot be checked from here: its lock stays until that pipeline ends or someone removes the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from aigc import storage
from aigc.errors import AigcError, LockHeldError

__all__ = ["LockHolder", "acquire", "lock_path", "pipeline_lock", "release"]

_START_SLACK_S = 2.0  # /proc start times are whole seconds of boot time plus clock ticks: equal within this
_ATTEMPTS = 5  # a lock that vanishes or reads half-written between our create and our read: look again


def lock_path(output_dir: str) -> str:
    return storage.join(output_dir, "pipeline", "lock.json")


@dataclass(frozen=True)
class LockHolder:
    """Who holds a pipeline lock: where, which process (and when it started, to tell a reused pid apart), since
    when, running what; ``token`` tells this holding apart from any other."""

    host: str
    pid: int
    pid_started_at: float | None
    since: float
    command: str
    token: str

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.since))
        return f"pid {self.pid} on {self.host}, since {since} ({_ago(self.since)} ago), running `{self.command}`"

    def is_gone(self) -> bool:
        """Whether the holding process has ended: only knowable on its own host (elsewhere: False)."""
        if self.host != socket.gethostname():
            return False
        return not _alive(self.pid, self.pid_started_at)


def acquire(output_dir: str, command: str | None = None, echo: Callable[[str], None] = print) -> LockHolder:
    """Take ``output_dir``'s pipeline lock for this process, or fail naming the process that holds it.

    A lock whose holder is gone (same host, pid ended or reused) is taken over, with one line to ``echo``.

    Args:
        output_dir: the pipeline's output directory (local or URI).
        command: what this process runs, shown to a second pipeline; default: this process's command line.
        echo: where the takeover line goes.

    Raises:
        LockHeldError: another live process holds the lock (or the file cannot be read as one).
        StorageError: the lock cannot be created on this filesystem.
    """
    path = lock_path(output_dir)
    me = LockHolder(socket.gethostname(), os.getpid(), _started_at(os.getpid()), time.time(),
                    command or shlex.join(sys.argv), uuid.uuid4().hex)  # fmt: skip
    data = json.dumps(asdict(me), indent=1).encode()
    for _ in range(_ATTEMPTS):
        if storage.create_exclusive(path, data):
            return me
        held = _read(path)
        if held is None:  # released (or still being written) between the two calls: try again
            time.sleep(0.2)
            continue
        if not held.is_gone():
            raise LockHeldError(_held_message(output_dir, path, held))
        # Only processes on the holder's own host take a dead holder's lock over, so a lock file on this host
        # serialises them: one removes the stale file and creates its own; the others then find that one alive.
        with _host_guard(path):
            if _read(path) == held:
                storage.remove_tree(path)
                if storage.create_exclusive(path, data):
                    echo(f"[pipeline] took over the lock on {output_dir} from {held.describe()}: that process is gone")
                    return me
    held = _read(path)
    if held is not None:
        raise LockHeldError(_held_message(output_dir, path, held))
    raise LockHeldError(f"{path} exists but cannot be read as a pipeline lock; if no pipeline runs on {output_dir}, "
                        f"remove it and run again")  # fmt: skip


def release(output_dir: str, me: LockHolder) -> None:
    """Remove the lock if it is still ``me``'s; a failure to remove it is printed, not raised (the next run on
    this host takes a dead holder's lock over)."""
    path = lock_path(output_dir)
    try:
        if _read(path) == me:
            storage.remove_tree(path)
    except (AigcError, OSError) as exc:
        print(f"[pipeline] could not remove the lock {path}: {exc}", flush=True)


@contextlib.contextmanager
def pipeline_lock(
    output_dir: str, command: str | None = None, echo: Callable[[str], None] = print
) -> Iterator[LockHolder]:
    """Hold ``output_dir``'s pipeline lock for the ``with`` block (released however the block ends)."""
    me = acquire(output_dir, command, echo)
    try:
        yield me
    finally:
        release(output_dir, me)


def _read(path: str) -> LockHolder | None:
    """The holder recorded at ``path``; None when there is no file, or it does not read as a lock (yet)."""
    try:
        raw = storage.read_json(path)
    except OSError:  # gone (released meanwhile), or the store cannot be read (then that error stands)
        if storage.exists(path):
            raise
        return None
    except ValueError:  # half-written: on a filesystem without hard links the create is not one step
        return None
    try:
        return LockHolder(**raw)
    except TypeError:
        return None


def _held_message(output_dir: str, path: str, held: LockHolder) -> str:
    if held.host == socket.gethostname():
        todo = f"wait for it to end, or stop it (kill {held.pid}); once it is gone, the next run takes its lock over"
    else:
        todo = (f"wait for it to end; if that process is gone ({held.host} cannot be checked from here), "
                f"remove {path} and run again")  # fmt: skip
    return f"another pipeline is running on {output_dir}: {held.describe()}. {todo[0].upper()}{todo[1:]}"


@contextlib.contextmanager
def _host_guard(path: str) -> Iterator[None]:
    """An exclusive ``flock`` held by one process on this host at a time, per lock path."""
    name = hashlib.sha256(storage.resolve(path).encode()).hexdigest()[:24]
    guard = os.path.join(tempfile.gettempdir(), f"aigc-lock-{name}")
    with open(guard, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alive(pid: int, started_at: float | None) -> bool:
    """Whether ``pid`` runs and is still the process that started at ``started_at`` (not a later one given the
    same pid); a zombie (killed, not yet reaped) counts as ended."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    stat = _proc_stat(pid)
    if stat is not None and stat[0] == "Z":
        return False
    now = _started_at(pid)
    return started_at is None or now is None or abs(now - started_at) < _START_SLACK_S


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3 onwards of ``/proc/<pid>/stat`` (state first); None without ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()  # the name (field 2) may hold spaces and parentheses
    except (OSError, IndexError):
        return None


def _started_at(pid: int) -> float | None:
    """When process ``pid`` started, in seconds since the epoch (Linux ``/proc``); None where unknown."""
    stat = _proc_stat(pid)
    try:
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in ticks since boot
    except (OSError, StopIteration, IndexError, ValueError, TypeError):
        return None


def _ago(t: float) -> str:
    s = max(0, int(time.time() - t))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

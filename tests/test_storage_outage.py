"""An object store that goes away in the middle of a publish: nothing half-registered, and the retry after it
comes back succeeds. The outage is real: the S3 server is reached through a TCP link this test cuts (closing
every open connection and refusing new ones) and restores, so the store keeps what it held, as a real one does."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import pytest
from helpers import free_port, make_tiny_adapter, make_tiny_model

from aigc import storage
from aigc.registry import Registry


class Link:
    """A TCP forwarder to ``127.0.0.1:target`` that can be cut and restored (same port)."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Every open connection reset, new ones refused."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@pytest.fixture
def adapter(tmp_path: Path) -> tuple[str, str]:
    base = make_tiny_model(tmp_path / "base")
    return base, make_tiny_adapter(base, tmp_path / "adapter")


def test_an_object_store_outage_mid_publish_leaves_nothing_half_registered(s3_server, adapter, monkeypatch):
    base, adapter_dir = adapter
    link = Link(s3_server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", link.endpoint)
    root = s3_server("outage")
    reg = Registry(root)
    copy_dir = storage.copy_dir
    copied: list[str] = []

    def copy_then_lose_the_store(src: str, dst: str) -> None:
        first = sorted(p.name for p in Path(src).iterdir())[0]  # one file reaches the store, then it is gone
        storage.write_bytes(storage.join(dst, first), (Path(src) / first).read_bytes())
        copied.append(first)
        link.cut()
        copy_dir(src, dst)

    monkeypatch.setattr(storage, "copy_dir", copy_then_lose_the_store)
    with pytest.raises(Exception):  # noqa: B017  (pyarrow's or boto's error: which one is not the promise)
        reg.register("bot", adapter_dir, base)
    assert copied, "the publish never reached the store before the outage"
    link.restore()
    monkeypatch.setattr(storage, "copy_dir", copy_dir)

    assert reg.versions("bot") == [] and reg.list() == []  # the half-written version is not published
    entry = reg.register("bot", adapter_dir, base)
    assert reg.versions("bot") == [entry.version]
    assert reg.resolve("bot").model_id == entry.model_id
    for f in Path(adapter_dir).iterdir():
        assert storage.read_bytes(storage.join(entry.adapter_uri, f.name)) == f.read_bytes()
    assert reg.register("bot", adapter_dir, base).version == entry.version  # and again: no duplicate

"""Shared fixtures: one small local Ray cluster for the whole test session."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# `tests/helpers.py` and the repository root (for `serve_apps`, `jobs`) are importable from every test.
_TESTS = Path(__file__).resolve().parent
for p in (_TESTS, _TESTS.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


class S3Server:
    """A local S3-compatible server (moto) on 127.0.0.1; calling it creates a bucket and returns ``s3://bucket/prefix``.

    Clients reach it through a TCP link (``helpers.Link``): ``cut()`` makes a real outage (open connections
    reset, new ones refused, in this process and in every Ray worker) and ``restore()`` ends it, with the store
    keeping what it held, as a real one does. ``stop()`` ends the server itself (moto keeps its data in memory).
    """

    def __init__(self, port: int):
        from helpers import Link

        self.port = port  # moto's own port; clients use the link's
        self._proc: subprocess.Popen | None = None
        self._counter = iter(range(10**6))
        self.link = Link(port)
        self.endpoint = self.link.endpoint

    def cut(self) -> None:
        self.link.cut()

    def restore(self) -> None:
        self.link.restore()

    def start(self) -> None:
        exe = Path(sys.executable).parent / "moto_server"
        self._proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}", timeout=2).close()
                return
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self._proc.kill()
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._proc = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def __call__(self, prefix: str = "run") -> str:
        name = f"aigc-test-{next(self._counter)}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}/{prefix}"


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto) on 127.0.0.1 for the whole session (:class:`S3Server`).

    It starts before the Ray cluster (``ray_cluster`` depends on it) and sets the standard AWS variables in
    this process's environment, so every Ray worker started afterwards reaches the same endpoint.
    """
    from helpers import free_port

    server = S3Server(free_port())
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update({"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})  # fmt: skip
    server.start()
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A local 4-CPU Ray cluster shared by every Ray test; Serve and Ray are shut down at session end."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4)  # never a `ray start` cluster that happens to run here
    yield ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        if started:
            ray.shutdown()


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A `ray start` head and a second node on this machine (tests/cluster.py), started once for a module's tests
    that submit jobs to a real cluster; both nodes (and the Serve app on them) are stopped when the module ends,
    so they do not hold CPUs while the rest of the suite runs."""
    from cluster import two_node_cluster as start

    with start(tmp_path_factory.mktemp("shared-storage")) as cluster:
        yield cluster


_SUBPROCESS_STAGE_MODULES = {"test_demo.py", "test_cluster.py"}  # run stages in subprocesses with their own cluster


def pytest_collection_modifyitems(config, items):
    """Mark every test that needs a Ray cluster (or runs a stage in a subprocess) as ``integration``, so the
    fast tier (``-m "not integration and not slow"``) never starts one."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()) or item.path.name in _SUBPROCESS_STAGE_MODULES:
            item.add_marker(pytest.mark.integration)

"""Shared fixtures: one small local Ray cluster for the whole test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `tests/helpers.py` and the repository root (for `serve_apps`, `jobs`) are importable from every test.
_TESTS = Path(__file__).resolve().parent
for p in (_TESTS, _TESTS.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


@pytest.fixture(scope="session")
def ray_cluster():
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


_SUBPROCESS_STAGE_MODULES = {"test_demo.py", "test_jobs.py"}  # run stages in subprocesses with their own cluster


def pytest_collection_modifyitems(config, items):
    """Mark every test that needs a Ray cluster (or runs a stage in a subprocess) as ``integration``, so the
    fast tier (``-m "not integration and not slow"``) never starts one."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()) or item.path.name in _SUBPROCESS_STAGE_MODULES:
            item.add_marker(pytest.mark.integration)

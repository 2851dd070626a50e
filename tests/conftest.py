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

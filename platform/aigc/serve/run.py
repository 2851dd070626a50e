"""Start the OpenAI-compatible app on the current Ray cluster (what ``aigc serve`` calls)."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from aigc.cluster import init_ray
from aigc.config import PlatformConfig
from aigc.serve.auth import check_exposure

__all__ = ["run_server", "wait_until_healthy"]


def _get_json(url: str, timeout: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def wait_until_healthy(base_url: str, timeout_s: float = 120.0) -> list[str]:
    """Poll ``GET /healthz`` then ``GET /v1/models`` until both answer; returns the model ids.

    A server that requires an API key answers ``/v1/models`` with 401: it is up, and the ids are not known
    here (the list is empty).

    Args:
        base_url: the server root, e.g. ``http://127.0.0.1:8000``.
        timeout_s: give up after this long.

    Raises:
        TimeoutError: the server did not answer in time (the last error is in the message).
    """
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            _get_json(f"{base_url}/healthz", timeout=5)
            try:
                return [m["id"] for m in _get_json(f"{base_url}/v1/models", timeout=10)["data"]]
            except urllib.error.HTTPError as exc:
                if exc.code != 401:
                    raise
                return []
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            last = exc
            time.sleep(0.5)
    raise TimeoutError(f"{base_url} did not become healthy within {timeout_s:.0f}s (last error: {last})")


def run_server(cfg: PlatformConfig, blocking: bool = True) -> str:
    """Deploy the app on ``cfg.serve.host:port`` and return the OpenAI base URL (``http://host:port/v1``).

    Uses the Ray cluster this process is connected to, or starts a local one. Serve's HTTP options are
    cluster-wide and fixed when Serve first starts: if Serve already runs on this cluster, its host and
    port stay as they are (and the returned URL assumes ``cfg.serve``'s).

    Args:
        cfg: the platform config (its ``model``, ``registry_dir`` and ``serve`` sections are used).
        blocking: wait until Ctrl-C, then shut Serve down; False returns as soon as the app is healthy.

    Raises:
        aigc.errors.ConfigError: ``serve.host`` is reachable from other machines and no API keys are configured.
    """
    s = cfg.serve
    check_exposure(s.host, s.auth, s.api_keys_file, s.api_keys_env)  # before any Ray work

    import ray
    from ray import serve

    from aigc.serve.builder import build_app_from_config  # imports Ray Serve: only when serving

    if not ray.is_initialized():
        init_ray(cfg.cluster.num_cpus)
    # One HTTP proxy, on the head node (as serve_apps/openai.yaml): proxies on other nodes would each need
    # the port, and clients reach the head's address.
    serve.start(http_options={"host": s.host, "port": s.port}, proxy_location="HeadOnly")
    serve.run(build_app_from_config(cfg), name=s.app_name, route_prefix="/")

    client_host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    root = f"http://{client_host}:{s.port}"
    models = wait_until_healthy(root)
    print(f"[serve] app {s.app_name!r} is up: OpenAI base_url {root}/v1 (pid {os.getpid()})")
    print(f"[serve] models: {', '.join(models)}" if models else "[serve] API keys required (serve.auth)")
    if blocking:
        print("[serve] Ctrl-C to stop")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            print("[serve] shutting down")
        finally:
            serve.shutdown()
    return f"{root}/v1"

"""Rollout under load: an alias move and a Serve redeploy while clients keep sending requests.

    PYTHONPATH=platform .venv/bin/python bench/rollout.py [--concurrency 8] [--max-tokens 16] [--json out.json]

The Serve app (``configs/demo.yaml``'s tiny base model, one generator replica) serves two registered versions
of ``rollout``; ``--concurrency`` clients (``httpx``, async, loopback) send chat requests for the bare name
``rollout`` without pause. While they do:

1. steady state (the baseline, measured in the same run): nothing changes;
2. alias move: ``aigc promote rollout:v2`` (``Registry.promote``), no redeploy; the phase lasts
   ``serve.resolve_cache_s`` + 2 s from the move;
3. redeploy with a changed config (``serve.max_batch_size`` 32 -> 16) and ``serve.max_surge_percent: 0``
   (Serve's default: the old replica stops before its replacement starts);
4. redeploy again (``max_batch_size`` 16 -> 8) with ``serve.max_surge_percent: 100`` (this platform's default:
   the old replica serves until the new one is ready).

A redeploy is ``serve.run`` of the updated application, what ``serve deploy`` of an edited YAML does: the
controller rolls the changed deployment. Each phase counts its requests (by start time), failures (any
non-200 or transport error), p50/p99 latency, and which version answered. Bounded in count (``--max-requests``)
and time (each request times out after 60 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from _adapters import register_random_adapter  # noqa: E402  (bench/ is on the path: the script's folder)

from aigc.config import load_config, with_values  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TIMEOUT_S = 60
MESSAGES = [{"role": "user", "content": "Where is my parcel?"}]


@dataclass
class Result:
    start: float
    end: float
    status: int  # 0 = transport error or timeout
    model: str | None


@dataclass
class Phase:
    name: str
    requests: int
    failures: int
    p50_s: float
    p99_s: float
    answered_by: dict[str, int]
    seconds: float


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


class Load:
    """``concurrency`` clients in a background event loop, each sending one request after another."""

    def __init__(self, url: str, concurrency: int, max_tokens: int, max_requests: int):
        self.url, self.concurrency, self.max_tokens, self.max_requests = url, concurrency, max_tokens, max_requests
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        import httpx

        body = {"model": "rollout", "messages": MESSAGES, "max_tokens": self.max_tokens, "temperature": 0}
        limits = httpx.Limits(max_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=TIMEOUT_S, limits=limits) as client:

            async def worker() -> None:
                while not self._stop.is_set() and len(self.results) < self.max_requests:
                    t0 = time.monotonic()
                    try:
                        r = await client.post("/chat/completions", json=body)
                        model = r.json().get("model") if r.status_code == 200 else None
                        status = r.status_code
                    except (httpx.HTTPError, ValueError):
                        status, model = 0, None
                    self.results.append(Result(t0, time.monotonic(), status, model))

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=TIMEOUT_S + 5)

    def phase(self, name: str, t0: float, t1: float) -> Phase:
        rs = [r for r in self.results if t0 <= r.start < t1]
        answered: dict[str, int] = {}
        for r in rs:
            if r.model:
                answered[r.model] = answered.get(r.model, 0) + 1
        lat = [r.end - r.start for r in rs if r.status == 200]
        failures = sum(r.status != 200 for r in rs)
        return Phase(name, len(rs), failures, _pct(lat, 0.5), _pct(lat, 0.99), answered, t1 - t0)


def _register_versions(base: str, registry_dir: str) -> None:
    """Two versions of ``rollout``: LoRA adapters with different random weights (different answers)."""
    for seed in (1, 2):
        register_random_adapter(base, registry_dir, "rollout", seed, r=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--steady-s", type=float, default=10.0, help="length of the steady-state phase")
    ap.add_argument("--max-requests", type=int, default=20000)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    from ray import serve

    from aigc.cli import check_stage
    from aigc.cluster import init_ray
    from aigc.registry import Registry
    from aigc.serve.builder import build_app_from_config
    from aigc.serve.run import run_server

    work = tempfile.mkdtemp(prefix="aigc-bench-rollout-")
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), [f"registry_dir={work}/registry",
                      f"output_dir={work}", "serve.max_batch_size=32", "serve.autoscaling.min_replicas=1",
                      "serve.autoscaling.max_replicas=1"])  # fmt: skip
    _register_versions(cfg.model.name_or_path, cfg.registry_dir)
    reg = Registry(cfg.registry_dir)
    reg.promote("rollout:v1")
    cfg = check_stage("serve", cfg)  # the checks `aigc serve` runs, before any Ray work
    init_ray(cfg.cluster.num_cpus)
    url = run_server(cfg, blocking=False)
    load = Load(url, args.concurrency, args.max_tokens, args.max_requests)
    phases: list[Phase] = []
    try:
        load.start()
        time.sleep(3)  # warm-up: adapters load, connections open
        t = time.monotonic()
        time.sleep(args.steady_s)
        phases.append(load.phase("steady state", t, time.monotonic()))

        # 1. alias move, no redeploy
        t = time.monotonic()
        reg.promote("rollout:v2")
        time.sleep(cfg.serve.resolve_cache_s + 2)
        phases.append(load.phase("alias move v1 -> v2", t, time.monotonic()))
        time.sleep(2)

        # 2. redeploys with a changed config: the old replica stops first, then with surge
        for batch, surge in ((16, 0), (8, 100)):
            new = with_values(cfg, {"serve.max_batch_size": batch, "serve.max_surge_percent": surge})
            t = time.monotonic()
            serve.run(build_app_from_config(new), name=cfg.serve.app_name, route_prefix="/")
            took = time.monotonic() - t
            time.sleep(2)
            p = load.phase(f"redeploy max_batch_size={batch}, surge {surge}%", t, time.monotonic())
            p.name += f" ({took:.1f} s to RUNNING)"
            phases.append(p)
            time.sleep(2)
        t = time.monotonic()
        time.sleep(args.steady_s / 2)
        phases.append(load.phase("steady state after", t, time.monotonic()))
    finally:
        load.stop()
        serve.shutdown()

    steady = phases[0]
    print(f"\n[rollout] {args.concurrency} concurrent clients, max_tokens {args.max_tokens}, greedy, "
          f"{len(load.results)} requests, model rollout (bare-name alias)")  # fmt: skip
    print(f"{'phase':<58}{'reqs':>6}{'fail':>6}{'p50 s':>8}{'p99 s':>8}{'p99 x':>7}  answered by")
    for p in phases:
        by = ", ".join(f"{k} {v}" for k, v in sorted(p.answered_by.items()))
        print(f"{p.name:<58}{p.requests:>6}{p.failures:>6}{p.p50_s:>8.3f}{p.p99_s:>8.3f}"
              f"{p.p99_s / steady.p99_s:>7.2f}  {by}")  # fmt: skip
    print(f"[rollout] failures in all: {sum(r.status != 200 for r in load.results)} of {len(load.results)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(p) for p in phases], f, indent=1)


if __name__ == "__main__":
    main()

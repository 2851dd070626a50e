"""A two-node Ray cluster on one machine, started with `ray start` as on a real cluster (token auth on).

    with two_node_cluster(shared_dir) as c:      # tests use the session fixture `two_node_cluster` instead
        subprocess.run([RAY, "job", "submit", ...], env=c.env())
        c.state("actors", "class_name=RayTrainWorker")   # Ray's state API: which node each actor ran on

The head (``head_node`` resource, 3 CPUs) and a second node (``node_b`` resource, 2 CPUs) join one GCS on
127.0.0.1; each has its own temp dir (a second node sharing the head's session dir breaks a job's working
dir) and its own ports (every agent and exporter port a second raylet on the same host would otherwise take
from the first). The nodes run with the project on PYTHONPATH, as a cluster image has it installed. CPUs are
logical: 5 on a 2-core machine, enough for a 2-worker run or two Serve replicas next to the job driver.
At the end both nodes are stopped by their own processes; ``ray stop`` would stop every cluster on the machine.
A test can also lose a node for real (``kill_node``: SIGKILL to its raylet and every process under it, as a
machine that dies) and bring up its replacement (``start_node``: a new node with the same resources, as an
autoscaler or a node pool replaces a lost machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from helpers import free_port

__all__ = ["RAY", "ROOT", "Cluster", "stop_processes", "two_node_cluster"]

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")

# Ports a second raylet on the same host must not share with the first (or with another cluster here).
_NODE_PORT_FLAGS = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
                    "dashboard-agent-grpc-port", "runtime-env-agent-port")  # fmt: skip
NODES = {"head": ("head_node", 3), "node_b": ("node_b", 2)}  # name -> (custom resource, logical CPUs)


@dataclass
class Cluster:
    """A running two-node cluster: its dashboard address and what the tests need to talk to it."""

    address: str  # the dashboard URL: RAY_ADDRESS for job submission, the state API and `serve deploy`
    gcs_port: int
    serve_port: int  # the one HTTP port Serve's head proxy uses in every test (Serve fixes it at its first start)
    shared_dir: Path  # a directory both nodes see, standing in for s3://
    token_path: str  # the cluster's auth token (RAY_AUTH_TOKEN_PATH for the nodes and every client)
    node_env: dict[str, str] = field(default_factory=dict)  # the environment `ray start` runs in
    temp_dirs: dict[str, str] = field(default_factory=dict)  # "head" / "node_b" -> the node's temp dir
    node_ids: dict[str, str] = field(default_factory=dict)  # "head" / "node_b" -> node id

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a client of this cluster: its address, token auth, the project importable."""
        path = os.pathsep.join([str(ROOT / "platform"), str(ROOT), os.environ.get("PYTHONPATH", "")])
        return {**os.environ, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": self.token_path, "PYTHONPATH": path, **extra}  # fmt: skip

    def state(self, kind: str, *filters: str) -> list[dict]:
        """``ray list <kind>`` through the state API, every field (``--detail``), e.g. ``state("nodes")``."""
        args = [RAY, "list", kind, "--address", self.address, "--format", "json", "--detail", "--limit", "10000"]
        for f in filters:
            args += ["--filter", f]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=self.env())
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    def node_of(self, node_id: str) -> str:
        """``head`` or ``node_b`` for a node id."""
        return {v: k for k, v in self.node_ids.items()}[node_id]

    def job_submit(self, *entrypoint: str, submission_id: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- <entrypoint>``, waited for.

        The entrypoint runs in a shell on the head node: tests name this interpreter (``sys.executable``), as a
        cluster image's ``python`` is the one with the project installed.
        """
        return subprocess.run(
            [RAY, "job", "submit", "--submission-id", submission_id, "--working-dir", ".",
             "--runtime-env", "jobs/runtime_env.yaml", "--", *entrypoint],
            cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=self.env(),
        )  # fmt: skip

    def start_node(self, name: str) -> None:
        """``ray start`` node ``name`` (``head`` or ``node_b``) with its resources, temp dir and ports of its own."""
        resource, cpus = NODES[name]
        self.temp_dirs[name] = tempfile.mkdtemp(prefix=f"rayc-{name}-", dir="/tmp")  # short: socket paths < 108
        ports = [f"--{flag}={free_port()}" for flag in _NODE_PORT_FLAGS]
        common = [f"--num-cpus={cpus}", f"--resources={json.dumps({resource: 1})}", "--node-ip-address=127.0.0.1",
                  f"--temp-dir={self.temp_dirs[name]}", *ports]  # fmt: skip
        if name == "head":
            dash = self.address.rsplit(":", 1)[1]
            _start_node(["--head", f"--port={self.gcs_port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                         f"--ray-client-server-port={free_port()}", *common], self.node_env)  # fmt: skip
        else:
            _start_node([f"--address=127.0.0.1:{self.gcs_port}", *common], self.node_env)

    def wait_alive(self, timeout_s: float = 120, lost: frozenset[str] = frozenset()) -> None:
        """Wait until the state API shows every node alive, and record their node ids; nodes whose id is in
        ``lost`` do not count (a killed node stays ALIVE until the GCS's health checks give up on it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            alive = [n for n in self.state("nodes") if n["state"] == "ALIVE" and n["node_id"] not in lost]
            ids = {name: n["node_id"] for n in alive for name, (res, _) in NODES.items() if res in n["resources_total"]}
            if len(ids) == len(NODES):
                self.node_ids.update(ids)
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(ids)} of {len(NODES)} nodes alive after {timeout_s:.0f}s")
            time.sleep(1)

    def kill_node(self, name: str) -> None:
        """Lose node ``name`` as a machine is lost: SIGKILL to its processes and theirs, no clean-up."""
        stop_processes(re.compile(re.escape(self.temp_dirs[name])), grace_s=0)

    def wait_dead(self, node_id: str, timeout_s: float = 120) -> float:
        """Wait until the GCS marks ``node_id`` DEAD; return the seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if any(n["node_id"] == node_id and n["state"] == "DEAD" for n in self.state("nodes")):
                return time.monotonic() - t0
            time.sleep(1)
        raise RuntimeError(f"node {node_id} still not DEAD after {timeout_s:.0f}s")

    def ray_job_id(self, submission_id: str) -> str:
        """The Ray job id (what actors record) of a submitted job."""
        (job,) = [j for j in self.state("jobs") if j.get("submission_id") == submission_id]
        return job["job_id"]


def _start_node(args: list[str], env: dict[str, str]) -> None:
    for attempt in (1, 2):  # `ray start` can time out on a loaded 2-core machine: once more before failing
        proc = subprocess.run([RAY, "start", *args], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
        if proc.returncode == 0:
            return
        if attempt == 2:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        time.sleep(5)


@contextlib.contextmanager
def two_node_cluster(shared_dir: Path, start_timeout_s: float = 120) -> Iterator[Cluster]:
    """Start the head and a second node, wait until the state API shows both alive, and stop both at the end."""
    gcs, dash = free_port(), free_port()
    # The cluster's own token, as an operator provisions one (`ray get-auth-token --generate`): on a fresh
    # machine there is no ~/.ray/auth_token, and `ray start --head` in token mode fails without one.
    token_dir = tempfile.mkdtemp(prefix="rayc-token-", dir="/tmp")
    token_path = os.path.join(token_dir, "auth_token")
    with open(token_path, "w") as f:
        f.write(secrets.token_hex(32))
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path,
           "RAY_SERVE_LOG_TO_STDERR": "0",
           "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}  # fmt: skip
    cluster = Cluster(f"http://127.0.0.1:{dash}", gcs, free_port(), shared_dir, token_path, env)
    try:
        for name in NODES:
            cluster.start_node(name)
        cluster.wait_alive(start_timeout_s)
        yield cluster
    finally:
        dirs = [token_dir, *cluster.temp_dirs.values()]
        stop_processes(re.compile("|".join([*map(re.escape, dirs), rf":{gcs}\b"])))
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def stop_processes(cmdline: re.Pattern, grace_s: float = 10) -> None:
    """Stop the processes whose command line matches ``cmdline`` and their children (SIGTERM, then SIGKILL after
    ``grace_s``; ``grace_s=0``: SIGKILL at once).

    A cluster's processes name its temp dir or its GCS port on their command line.
    """
    import psutil

    roots = [p for p in psutil.process_iter(["cmdline"]) if cmdline.search(" ".join(p.info["cmdline"] or []))]
    procs = {p.pid: p for r in roots for p in (r, *r.children(recursive=True))}
    procs.pop(os.getpid(), None)
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.terminate() if grace_s else p.kill()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s or 10)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()

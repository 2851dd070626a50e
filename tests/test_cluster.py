"""docs/cluster.md's commands, against a real two-node cluster on this machine (`make test-cluster`).

The module fixture ``two_node_cluster`` (tests/cluster.py) starts a `ray start` head and a second node with
token auth on. Against it: every ``jobs/*.py`` submitted with ``ray job submit`` reaches SUCCEEDED; a 2-worker
training run puts a worker on each node (Ray's state API) with its checkpoints on storage both nodes see (a
directory standing in for s3://); the Serve app runs a replica on each node behind the head's proxy; then the
The documented commands: ``aigc submit``, ``aigc jobs list|logs|stop``, ``serve deploy``, ``aigc promote`` and
``aigc rollback`` while a client keeps sending requests; last, ``aigc submit pipeline`` from data to a promoted,
served adapter.

The tests share one run directory and build on each other in file order (preprocess -> train -> sweep ->
serve), as the stages do; a small generated dataset and one epoch keep each job short. ``jobs/demo.py`` is the
same door to the demo stage, which tests/test_demo.py runs end to end; as a job here it took 5 minutes (measured
on 2 cores), more than the rest of this module together, so it is not repeated here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cluster import ROOT, Cluster

pytestmark = pytest.mark.slow

SERVE = str(Path(sys.executable).parent / "serve")
_ROWS = 400  # generated support examples: enough for a 2-worker epoch, small enough for a minute on 2 cores


@dataclass
class Run:
    """One run directory on the shared storage and the overrides every job of this module gets."""

    data: Path
    out: Path
    registry: Path
    overrides: list[str]
    finetune_history: list[dict] | None = None  # train/history.json of the uninterrupted 2-worker run


@pytest.fixture(scope="module")
def run(two_node_cluster: Cluster) -> Run:
    from aigc.demo.dataset import generate_support_examples

    root = two_node_cluster.shared_dir / "run"
    root.mkdir()
    src = root / "support.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in generate_support_examples(_ROWS, seed=3)))
    out, registry = root / "out", root / "registry"
    overrides = [f"output_dir={out}", f"registry_dir={registry}", f"data.path={src}", "tracking.mlflow=false",
                 "train.epochs=1", "train.eval_generation_samples=0"]  # fmt: skip
    return Run(src, out, registry, overrides)


def _submit_job(cluster: Cluster, script: str, run: Run, *extra: str, submission_id: str) -> str:
    """Submit ``jobs/<script>`` with ``ray job submit``; assert it SUCCEEDED; return its log."""
    t0 = time.monotonic()
    proc = cluster.job_submit(sys.executable, script, "--config", "configs/demo.yaml", *run.overrides, *extra,
                              submission_id=submission_id)  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, (script, log[-4000:])
    assert f"Job '{submission_id}' succeeded" in log, log[-4000:]
    print(f"{script}: {time.monotonic() - t0:.0f}s")
    return log


def test_two_nodes_each_with_its_own_resources(two_node_cluster):
    nodes = {n["node_id"]: n for n in two_node_cluster.state("nodes") if n["state"] == "ALIVE"}
    head, node_b = (nodes[two_node_cluster.node_ids[k]]["resources_total"] for k in ("head", "node_b"))
    assert (head["CPU"], head["head_node"], "node_b" in head) == (3, 1, False)
    assert (node_b["CPU"], node_b["node_b"], "head_node" in node_b) == (2, 1, False)


def test_preprocess_job(two_node_cluster, run):
    log = _submit_job(two_node_cluster, "jobs/preprocess.py", run, submission_id="cluster-preprocess")
    assert "[preprocess]" in log
    stats = json.loads((run.out / "data" / "stats.json").read_text())
    assert stats["rows_kept"] + sum(stats["rows_rejected"].values()) == _ROWS and stats["rows_kept"] > 0.9 * _ROWS


def test_finetune_job_puts_a_worker_on_each_node_and_checkpoints_on_shared_storage(two_node_cluster, run):
    c = two_node_cluster
    _submit_job(c, "jobs/finetune.py", run, "train.num_workers=2", "train.placement_strategy=STRICT_SPREAD",
                submission_id="cluster-finetune")  # fmt: skip
    workers = c.state("actors", "class_name=RayTrainWorker", f"job_id={c.ray_job_id('cluster-finetune')}")
    assert sorted(c.node_of(w["node_id"]) for w in workers) == ["head", "node_b"], workers
    # Both workers wrote through the same path (rank 0 the checkpoint files); the run's checkpoints and the
    # exported adapter are where every node reads them.
    checkpoints = [p for p in (run.out / "ray" / "support-bot").glob("checkpoint_*") if p.is_dir()]
    assert checkpoints and all(any(p.iterdir()) for p in checkpoints), checkpoints
    assert (run.out / "adapter" / "adapter_model.safetensors").is_file()
    meta = json.loads((run.registry / "support-bot" / "v1" / "meta.json").read_text())
    assert meta["config"]["train"]["num_workers"] == 2
    run.finetune_history = json.loads((run.out / "train" / "history.json").read_text())


def test_sweep_job(two_node_cluster, run):
    log = _submit_job(two_node_cluster, "jobs/sweep.py", run, "tune.num_samples=2", "tune.scheduler=none",
                      submission_id="cluster-sweep")  # fmt: skip
    assert "[sweep]" in log
    trials = (run.out / "sweep" / "trials.csv").read_text().splitlines()
    assert len(trials) == 1 + 2, trials
    assert (run.out / "sweep" / "best_config.yaml").is_file()
    assert (run.registry / "support-bot" / "v2" / "meta.json").is_file()  # the sweep's best, after train's v1


def _post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _chat(port: int, model: str) -> tuple[int, dict]:
    body = {"model": model, "messages": [{"role": "user", "content": "my parcel never arrived"}], "max_tokens": 4}
    return _post(f"http://127.0.0.1:{port}/v1/chat/completions", body)


def _serve_shutdown(cluster: Cluster) -> None:
    proc = subprocess.run([SERVE, "shutdown", "-a", cluster.address, "-y"], capture_output=True, text=True,
                          timeout=120, env=cluster.env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


def _generator_nodes(cluster: Cluster) -> list[str]:
    replicas = cluster.state("actors", "class_name=ServeReplica:aigc:Generator", "state=ALIVE")
    return sorted(cluster.node_of(r["node_id"]) for r in replicas)


def test_serve_job_deploys_a_replica_on_each_node_behind_the_head_proxy(two_node_cluster, run):
    """As a job, the serve stage deploys, waits until the app answers and ends; the app keeps serving."""
    c = two_node_cluster
    try:
        log = _submit_job(c, "jobs/serve.py", run, f"serve.port={c.serve_port}", "serve.autoscaling.min_replicas=2",
                          "serve.autoscaling.max_replicas=2", submission_id="cluster-serve")  # fmt: skip
        assert "keeps running on the cluster" in log
        assert _generator_nodes(c) == ["head", "node_b"]  # Serve spreads a deployment's replicas over nodes
        answered = set()
        for _ in range(8):  # bounded: 8 requests through the head's proxy, after the job has ended
            status, body = _chat(c.serve_port, "support-bot")
            assert status == 200, body
            answered.add(body["model"])
        assert answered == {"support-bot:v2"}  # no alias yet: the newest version
    finally:
        _serve_shutdown(c)


def _running_generators(cluster: Cluster) -> int:
    """Generator replicas Serve reports RUNNING (``serve status``: started and passing health checks)."""
    proc = subprocess.run([SERVE, "status", "-a", cluster.address], capture_output=True, text=True, timeout=60,
                          env=cluster.env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    apps = (yaml.safe_load(proc.stdout) or {}).get("applications") or {}
    deployment = ((apps.get("aigc") or {}).get("deployments") or {}).get("Generator") or {}
    return int((deployment.get("replica_states") or {}).get("RUNNING", 0))


def _wait_replicas(cluster: Cluster, want: int, timeout_s: float) -> float:
    """Seconds until exactly ``want`` generator replicas run (polled every second); fails after ``timeout_s``."""
    t0 = time.monotonic()
    seen = -1
    while time.monotonic() - t0 < timeout_s:
        seen = _running_generators(cluster)
        if seen == want:
            return time.monotonic() - t0
        time.sleep(1)
    raise AssertionError(f"{seen} generator replicas running after {timeout_s:.0f}s, expected {want}")


def test_autoscaling_up_under_load_and_back_down_without_a_failed_request(two_node_cluster, run):
    """Eight callers without pause drive the generator from min_replicas=1 to 2 (one per node); when they stop,
    it returns to 1 while one caller goes on, and every request of both phases succeeds (a replica being
    removed finishes its requests first). The times printed here are docs/serving.md's autoscaling figures."""
    c = two_node_cluster
    scaling = ["serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=2",
               "serve.autoscaling.target_ongoing_requests=2", "serve.autoscaling.upscale_delay_s=2",
               "serve.autoscaling.downscale_delay_s=10", "serve.ingress_replicas=2"]  # fmt: skip
    heavy = [_Traffic(c.serve_port, "tiny-base", limit=3000) for _ in range(8)]  # the base: no adapter needed
    light = _Traffic(c.serve_port, "tiny-base", limit=3000)
    try:
        _submit_job(c, "jobs/serve.py", run, f"serve.port={c.serve_port}", *scaling, submission_id="cluster-scale")
        assert _wait_replicas(c, 1, 60) < 60
        for t in (*heavy, light):
            t.start()
        up_s = _wait_replicas(c, 2, 180)
        assert _generator_nodes(c) == ["head", "node_b"]
        for t in heavy:
            t.done.set()
        for t in heavy:
            t.join(timeout=90)
        during_scale_down = len(light.answers)
        down_s = _wait_replicas(c, 1, 240)
        time.sleep(3)  # requests that were on the removed replica have finished by now
        print(f"[autoscale] 1 -> 2 replicas in {up_s:.0f}s under 8 callers; 2 -> 1 in {down_s:.0f}s after they "
              f"stopped; {len(light.answers) - during_scale_down} requests during the scale-down")  # fmt: skip
    finally:
        for t in (*heavy, light):
            t.done.set()
        for t in (*heavy, light):
            if t.is_alive():
                t.join(timeout=90)
        _serve_shutdown(c)
    heavy_failed = [a for t in heavy for a in t.answers if a[0] != 200]
    assert not heavy_failed, heavy_failed[:5]
    light_failed = [a for a in light.answers if a[0] != 200]
    assert not light_failed and len(light.answers) > during_scale_down, light_failed[:5]


def _aigc(cluster: Cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aigc.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=cluster.env())  # fmt: skip


class _Traffic(threading.Thread):
    """Sends requests for ``model`` one after another until stopped (at most ``limit``); records each answer."""

    def __init__(self, port: int, model: str, limit: int = 400) -> None:
        super().__init__(daemon=True)
        self.port, self.model, self.limit = port, model, limit
        self.answers: list[tuple[int, str]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and len(self.answers) < self.limit:
            try:
                status, body = _chat(self.port, self.model)
            except OSError as exc:  # a dropped connection counts as a failure
                status, body = 0, {"error": str(exc)}
            self.answers.append((status, body.get("model", json.dumps(body)[:200])))

    def wait_for(self, model: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        n = len(self.answers)
        while time.monotonic() < deadline:
            if any(m == model for _, m in self.answers[n:]):
                return
            time.sleep(0.2)
        raise AssertionError(f"no answer from {model} within {timeout_s:.0f}s: {self.answers[n:][-5:]}")


def test_serve_deploy_then_promote_and_rollback_under_traffic(two_node_cluster, run, tmp_path):
    """`serve deploy serve_apps/openai.yaml` (this run's model and registry, this cluster's port), then the documented
    `aigc promote` / `aigc rollback` while a client keeps sending requests: every one succeeds."""
    from aigc.serve.run import wait_until_healthy

    c = two_node_cluster
    spec = yaml.safe_load((ROOT / "serve_apps" / "openai.yaml").read_text())
    spec["http_options"]["port"] = c.serve_port
    (app,) = spec["applications"]
    # Absolute paths, as the YAML's header asks for on a multi-node cluster.
    app["args"]["config"] = str(ROOT / app["args"]["config"])
    app["args"]["overrides"] = [f"model.name_or_path={ROOT / 'assets' / 'tiny-base'}", f"registry_dir={run.registry}"]
    config = tmp_path / "openai.yaml"
    config.write_text(yaml.safe_dump(spec))
    deploy = subprocess.run([SERVE, "deploy", str(config), "-a", c.address], capture_output=True, text=True,
                            timeout=120, env=c.env())  # fmt: skip
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    traffic = _Traffic(c.serve_port, "support-bot")
    try:
        models = wait_until_healthy(f"http://127.0.0.1:{c.serve_port}", timeout_s=180)
        assert {"support-bot", "support-bot:v1", "support-bot:v2"} <= set(models), models
        traffic.start()
        traffic.wait_for("support-bot:v2")
        promote = _aigc(c, "promote", "support-bot:v1", f"registry_dir={run.registry}")
        assert promote.returncode == 0, promote.stderr[-2000:]
        assert "support-bot -> support-bot:v1 (was unset (latest))" in promote.stdout, promote.stdout
        traffic.wait_for("support-bot:v1")
        promote = _aigc(c, "promote", "support-bot:v2", f"registry_dir={run.registry}")
        assert promote.returncode == 0 and "(was v1)" in promote.stdout, promote.stdout + promote.stderr[-2000:]
        traffic.wait_for("support-bot:v2")
        rollback = _aigc(c, "rollback", "support-bot", f"registry_dir={run.registry}")
        assert rollback.returncode == 0, rollback.stderr[-2000:]
        assert "support-bot -> support-bot:v1 (was v2)" in rollback.stdout, rollback.stdout
        traffic.wait_for("support-bot:v1")
    finally:
        traffic.done.set()
        traffic.join(timeout=90)
        _serve_shutdown(c)
    failed = [a for a in traffic.answers if a[0] != 200]
    assert not failed and len(traffic.answers) >= 3, failed[:5]
    assert {m for _, m in traffic.answers} == {"support-bot:v1", "support-bot:v2"}


def _job_status(cluster: Cluster, job_id: str) -> str:
    listed = _aigc(cluster, "jobs", "list")
    assert listed.returncode == 0, listed.stderr[-2000:]
    return {j["id"]: j["status"] for j in map(json.loads, listed.stdout.splitlines())}[job_id]


def _wait_status(cluster: Cluster, job_id: str, until: set[str], timeout_s: float = 120) -> str:
    deadline, status = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        status = _job_status(cluster, job_id)
        if status in until:
            break
        time.sleep(1)
    return status


def test_aigc_submit_and_jobs_commands(two_node_cluster, run, tmp_path):
    """`aigc submit` ships the project through JobSubmissionClient (token auth from RAY_AUTH_MODE=token and the
    token `ray start` wrote); `aigc jobs list | logs [--follow] | stop` see it and the jobs submitted above."""
    c = two_node_cluster
    sub = _aigc(c, "submit", "preprocess", "--config", "configs/demo.yaml", "--python", sys.executable,
                f"output_dir={tmp_path / 'out'}", f"data.path={run.data}")  # fmt: skip
    assert sub.returncode == 0, sub.stderr[-3000:]
    job_id = sub.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"raysubmit_\w+", job_id), sub.stdout
    assert _wait_status(c, job_id, {"RUNNING", "SUCCEEDED", "FAILED"}) == "RUNNING"
    stop = _aigc(c, "jobs", "stop", job_id)
    assert stop.returncode == 0 and f"{job_id}: stop requested" in stop.stdout, stop.stdout
    follow = _aigc(c, "jobs", "logs", job_id, "--follow", timeout=120)  # returns once the job has ended
    assert follow.returncode == 0, follow.stderr[-2000:]
    assert _wait_status(c, job_id, {"STOPPED", "SUCCEEDED", "FAILED"}) == "STOPPED"

    listed = _aigc(c, "jobs", "list")
    jobs = {j["id"]: j for j in map(json.loads, listed.stdout.splitlines())}
    assert jobs[job_id]["entrypoint"].startswith(f"{sys.executable} jobs/preprocess.py --config configs/demo.yaml")
    assert jobs["cluster-preprocess"]["status"] == "SUCCEEDED"  # `ray job submit`'s jobs are listed too
    logs = _aigc(c, "jobs", "logs", "cluster-preprocess")
    assert logs.returncode == 0 and "[preprocess]" in logs.stdout
    again = _aigc(c, "jobs", "stop", "cluster-preprocess")
    assert again.returncode == 0 and "already finished" in again.stdout
    missing = _aigc(c, "jobs", "logs", "raysubmit_nope")
    assert missing.returncode == 1 and "raysubmit_nope" in missing.stderr and "Traceback" not in missing.stderr


def test_aigc_submit_pipeline_registers_promotes_and_serves_on_the_cluster(two_node_cluster, run):
    """The one-job path: `aigc submit pipeline` runs data -> trained, registered, promoted adapter -> the Serve
    app on this cluster -> a smoke answer, and the job ends while the app keeps serving the promoted version."""
    c = two_node_cluster
    out = c.shared_dir / "pipeline-out"
    try:
        sub = _aigc(c, "submit", "pipeline", "--config", "configs/demo.yaml", "--python", sys.executable,
                    *run.overrides, f"output_dir={out}", "pipeline.sweep=false", "train.num_workers=1",
                    f"serve.port={c.serve_port}")  # fmt: skip
        assert sub.returncode == 0, sub.stderr[-3000:]
        job_id = sub.stdout.strip().splitlines()[-1]
        status = _wait_status(c, job_id, {"SUCCEEDED", "FAILED", "STOPPED"}, timeout_s=600)
        logs = _aigc(c, "jobs", "logs", job_id).stdout
        assert status == "SUCCEEDED", logs[-4000:]
        served = re.search(r"\[pipeline\] serving support-bot -> (support-bot:v\d+) at ", logs)
        assert served, logs[-3000:]
        state = json.loads((out / "pipeline" / "state.json").read_text())
        stages = ("preprocess", "train", "register", "promote", "deploy", "smoke")  # pipeline.sweep=false
        assert {s: r["status"] for s, r in state["stages"].items()} == dict.fromkeys(stages, "done")
        for _ in range(3):  # bounded: after the job has ended, the promoted version answers through the head
            status_code, body = _chat(c.serve_port, "support-bot")
            assert status_code == 200 and body["model"] == served.group(1), body
    finally:
        _serve_shutdown(c)


def test_training_survives_a_lost_worker_node_and_resumes_on_its_replacement(two_node_cluster, run):
    """The 2-worker run of ``test_finetune_job`` again, one worker per node, checkpoints every 2 steps: after step
    5, while rank 0 (on the head) holds (``AIGC_HOLD_AT_STEP``), node_b is lost for real (SIGKILL to its raylet and
    every process under it, rank 1 among them) and a replacement node joins, as an autoscaler brings one. Ray
    Train's FailureConfig restarts the worker group on the head and the new node from step 4's checkpoint; the
    run reaches the uninterrupted run's final step and final eval loss and registers one version.

    Measured on 2 cores: the final eval loss equals the uninterrupted run's exactly (gloo, seeded, the same
    batches in the same order after the resume); the test asserts equality as the single-node worker-kill
    test does.
    """
    c = two_node_cluster
    assert run.finetune_history, "needs test_finetune_job's run to compare with"
    marker, release = c.shared_dir / "node-loss-held.json", c.shared_dir / "node-loss-release"  # never released
    registry = c.shared_dir / "node-loss-registry"
    submitted: dict[str, subprocess.CompletedProcess] = {}

    def submit() -> None:
        submitted["proc"] = c.job_submit(
            "env", "AIGC_HOLD_AT_STEP=5", f"AIGC_HOLD_RELEASE={release}", f"AIGC_FAULT_MARKER={marker}",
            sys.executable, "jobs/finetune.py", "--config", "configs/demo.yaml", *run.overrides,
            "train.num_workers=2", "train.placement_strategy=STRICT_SPREAD", "train.checkpoint_every_steps=2",
            "train.cache_data=false", f"registry_dir={registry}", submission_id="cluster-node-loss",
        )  # fmt: skip

    job = threading.Thread(target=submit, daemon=True)
    job.start()
    deadline = time.monotonic() + 300
    while not marker.exists() and job.is_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert marker.exists(), submitted.get("proc") and (submitted["proc"].stdout + submitted["proc"].stderr)[-4000:]
    assert json.loads(marker.read_text())["step"] == 5
    job_id = c.ray_job_id("cluster-node-loss")
    first = c.state("actors", "class_name=RayTrainWorker", f"job_id={job_id}")
    lost = c.node_ids["node_b"]
    assert sorted(c.node_of(w["node_id"]) for w in first) == ["head", "node_b"], first

    t0 = time.monotonic()
    c.kill_node("node_b")
    c.start_node("node_b")  # the replacement joins at once, as a node pool brings one up
    c.wait_alive(lost=frozenset({lost}))
    assert c.node_ids["node_b"] != lost
    print(f"lost node DEAD after {c.wait_dead(lost):.0f}s")
    job.join(timeout=600)
    proc = submitted["proc"]
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Job 'cluster-node-loss' succeeded" in log, log[-4000:]
    print(f"node lost -> run finished: {time.monotonic() - t0:.0f}s")

    workers = c.state("actors", "class_name=RayTrainWorker", f"job_id={job_id}")
    assert c.node_ids["node_b"] in {w["node_id"] for w in workers}, workers  # the restarted group used the new node
    history = json.loads((run.out / "train" / "history.json").read_text())
    straight = run.finetune_history[-1]
    assert history[-1]["step"] == straight["step"] and history[-1]["epoch"] == straight["epoch"] == 1
    print(f"eval loss after the node loss {history[-1]['eval_loss']!r} vs uninterrupted {straight['eval_loss']!r}")
    assert history[-1]["eval_loss"] == straight["eval_loss"]
    assert [p.name for p in (registry / "support-bot").iterdir() if p.name.startswith("v")] == ["v1"]

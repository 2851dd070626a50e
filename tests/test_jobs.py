"""`ray job submit` against a real `ray start` cluster (token auth on), as README's cluster section says.

Slow tier: it starts a second Ray cluster of its own, on its own ports, and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_head():
    gcs, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayjobs-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, "RAY_ADDRESS": ""}
    try:
        subprocess.run(
            [RAY, "start", "--head", "--num-cpus=2", f"--port={gcs}", f"--dashboard-port={dash}",
             "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
             # Ports of its own: the session's local cluster may hold the defaults (its agent on 52365...).
             *(f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
               "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port"))],
            check=True, capture_output=True, timeout=180, env=env,
        )  # fmt: skip
        yield f"http://127.0.0.1:{dash}"
    finally:
        _stop_cluster(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_cluster(temp_dir: str, gcs_port: int) -> None:
    """Stop this test's cluster only: ``ray stop`` would also stop the test session's own local cluster.

    Its processes name its temp dir or its GCS port on their command line; their children go with them.
    """
    import psutil

    mine = re.compile(rf"{re.escape(temp_dir)}|:{gcs_port}\b")
    roots = [p for p in psutil.process_iter(["cmdline"]) if mine.search(" ".join(p.info["cmdline"] or []))]
    procs = {p.pid: p for r in roots for p in (r, *r.children(recursive=True))}
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=20)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


@pytest.mark.slow
def test_preprocess_and_finetune_jobs_on_a_started_cluster(ray_head, tmp_path):
    # The job's entrypoint runs in a shell on the head node: name this interpreter, as a cluster image's
    # `python` would be the one with the project installed.
    env = {**os.environ, "RAY_ADDRESS": ray_head, "RAY_AUTH_MODE": "token"}
    common = ["--config", "configs/demo.yaml", f"output_dir={tmp_path}", f"registry_dir={tmp_path / 'registry'}"]
    for script, extra in (("jobs/preprocess.py", []), ("jobs/finetune.py", ["train.epochs=1", "train.num_workers=1"])):
        t0 = time.time()
        proc = subprocess.run(
            [RAY, "job", "submit", "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--",
             sys.executable, script, *common, *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, (script, proc.stdout[-3000:], proc.stderr[-3000:])
        assert "succeeded" in proc.stdout + proc.stderr, script
        print(f"{script}: {time.time() - t0:.0f}s")
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["rows_kept"] == 2000 and sum(stats["rows_rejected"].values()) == 8
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "registry" / "support-bot" / "v1" / "meta.json").is_file()


def _aigc(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aigc.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


@pytest.mark.slow
def test_aigc_submit_and_jobs_commands_on_a_started_cluster(ray_head, tmp_path):
    """`aigc submit` ships the project through JobSubmissionClient (token auth from RAY_AUTH_MODE=token and the
    token `ray start` wrote); `aigc jobs list | logs | stop` see the job."""
    env = {**os.environ, "RAY_ADDRESS": ray_head, "RAY_AUTH_MODE": "token",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    sub = _aigc("submit", "preprocess", "--config", "configs/demo.yaml", "--python", sys.executable,
                f"output_dir={tmp_path}", env=env)  # fmt: skip
    assert sub.returncode == 0, sub.stderr[-3000:]
    job_id = sub.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"raysubmit_\w+", job_id), sub.stdout
    deadline, status = time.monotonic() + 400, None
    while time.monotonic() < deadline:
        listed = _aigc("jobs", "list", env=env)
        assert listed.returncode == 0, listed.stderr[-2000:]
        jobs = {j["id"]: j for j in map(json.loads, listed.stdout.splitlines())}
        status = jobs[job_id]["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    logs = _aigc("jobs", "logs", job_id, env=env)
    assert status == "SUCCEEDED", logs.stdout[-3000:]
    assert jobs[job_id]["entrypoint"].startswith(f"{sys.executable} jobs/preprocess.py --config configs/demo.yaml")
    assert "[preprocess]" in logs.stdout
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["rows_kept"] == 2000
    follow = _aigc("jobs", "logs", job_id, "--follow", env=env)  # a finished job: its whole log, then return
    assert follow.returncode == 0 and "[preprocess]" in follow.stdout
    stop = _aigc("jobs", "stop", job_id, env=env)
    assert stop.returncode == 0 and "already finished" in stop.stdout
    missing = _aigc("jobs", "logs", "raysubmit_nope", env=env)
    assert missing.returncode == 1 and "raysubmit_nope" in missing.stderr and "Traceback" not in missing.stderr

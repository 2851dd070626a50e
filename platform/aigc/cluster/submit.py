"""Run a stage on a remote Ray cluster as a Ray job, and look after the jobs (``aigc submit`` / ``aigc jobs``).

    export RAY_ADDRESS=http://127.0.0.1:8265      # the cluster's dashboard (e.g. `ray dashboard cluster.yaml`)
    export RAY_AUTH_MODE=token                    # Ray 2.60 clusters want a token: ~/.ray/auth_token,
                                                  # RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (`ray get-auth-token`)
    aigc submit train --config configs/demo.yaml output_dir=s3://my-bucket/runs/demo
    aigc jobs list | aigc jobs logs ID [--follow] | aigc jobs stop ID

A submission is what ``ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python
jobs/<stage>.py ...`` sends: the project directory (without run outputs, virtualenvs and VCS data) as the
job's working dir, the ``aigc`` package as a py_module, and ``jobs/runtime_env.yaml`` for the rest.
``ray.job_submission.JobSubmissionClient`` uploads both and adds the token header itself. ``HF_TOKEN``, when set
here, goes with the job in its runtime env: the job's driver resolves and downloads the base model
(:mod:`aigc.models.hub`), and a gated one needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import yaml

from aigc.errors import ClusterError, ConfigError

__all__ = ["EXCLUDES", "STAGE_SCRIPTS", "build_runtime_env", "entrypoint", "list_jobs", "stop_job",
           "submit_stage", "write_logs"]  # fmt: skip

STAGE_SCRIPTS = {
    "preprocess": "jobs/preprocess.py",
    "train": "jobs/finetune.py",
    "sweep": "jobs/sweep.py",
    "serve": "jobs/serve.py",
    "demo": "jobs/demo.py",
    "demo-preference": "jobs/demo_preference.py",
    "pipeline": "jobs/pipeline.py",
    "generate": "jobs/generate.py",
    "eval": "jobs/eval.py",
}
# Never uploaded (gitignore syntax): run outputs, environments, VCS data and caches. Ray caps a working dir
# at 500 MiB; these are what would blow it.
EXCLUDES = ["runs/", ".venv/", ".git/", "mlruns/", "tensorboard/", "__pycache__/", "*.pyc", ".pytest_cache/",
            ".ruff_cache/"]  # fmt: skip


def project_root() -> str:
    """The directory holding ``jobs/`` and ``platform/aigc`` (this package's checkout)."""
    return os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def build_runtime_env(root: str) -> dict[str, Any]:
    """``jobs/runtime_env.yaml`` plus the working dir (``root`` without :data:`EXCLUDES`) and the package."""
    with open(os.path.join(root, "jobs", "runtime_env.yaml")) as f:
        env = yaml.safe_load(f) or {}
    env["working_dir"] = root
    env["excludes"] = sorted({*env.get("excludes", []), *EXCLUDES})
    # The package as its own module (not only inside the working dir) so it is importable wherever the job's
    # tasks and actors run, as `--runtime-env jobs/runtime_env.yaml` ships it.
    env["py_modules"] = [os.path.join(root, "platform", "aigc")]
    # The driver downloads the base model: a gated or private one needs the token, and Ray hands a job's env_vars
    # to its driver and workers alone. Ray shows a job's runtime env in its dashboard and writes it to each node's
    # runtime_env_agent.log: on a shared cluster give the nodes HF_TOKEN in their own environment instead.
    token = os.environ.get("HF_TOKEN")
    if token:
        env["env_vars"] = {**(env.get("env_vars") or {}), "HF_TOKEN": token}
    return env


def entrypoint(stage: str, config: str | None, overrides: list[str], root: str, python: str = "python") -> str:
    """The shell command the job runs on the head node, from inside the uploaded working dir.

    ``python`` is the interpreter there: the cluster image's, which has the dependencies.

    Raises:
        ConfigError: an unknown stage, or a config file outside ``root`` (it would not be uploaded).
    """
    if stage not in STAGE_SCRIPTS:
        raise ConfigError(f"unknown stage {stage!r}: submit one of {', '.join(STAGE_SCRIPTS)}")
    args = [python, STAGE_SCRIPTS[stage]]
    if config is not None:
        path = os.path.abspath(config)
        if not os.path.isfile(path):
            raise ConfigError(f"--config {config}: no such file")
        rel = os.path.relpath(path, root)
        if rel.startswith(".."):
            raise ConfigError(f"--config {config} is outside {root}, which is what the job gets: move it inside")
        args += ["--config", rel]
    return shlex.join([*args, *overrides])


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    url = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {url} ({_first_line(exc)}); {_HINT}") from None


_HINT = "set RAY_ADDRESS to its dashboard URL, and RAY_AUTH_MODE=token with its token (see `ray get-auth-token`)"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


@contextlib.contextmanager
def _job_call(what: str) -> Iterator[None]:
    """Client errors (job not found, refused token...) as one-line platform errors."""
    try:
        yield
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterError(f"{what}: {_first_line(exc)}") from None


def submit_stage(
    stage: str, config: str | None, overrides: list[str], address: str | None = None, python: str = "python"
) -> str:
    """Submit ``stage`` as a Ray job; returns its submission id.

    Raises:
        ConfigError: an unknown stage or a config file the job would not get.
        ClusterError: the cluster cannot be reached or refused the job.
    """
    root = project_root()
    cmd = entrypoint(stage, config, overrides, root, python)
    client = _client(address)
    with _job_call(f"submitting {stage}"):
        return client.submit_job(entrypoint=cmd, runtime_env=build_runtime_env(root))


def list_jobs(address: str | None = None) -> list[dict[str, Any]]:
    """Submitted jobs, oldest first: id, status, entrypoint, start time (ms since the epoch)."""
    client = _client(address)
    with _job_call("listing jobs"):
        jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    return [{"id": j.submission_id, "status": getattr(j.status, "value", str(j.status)), "entrypoint": j.entrypoint,
             "start_time": j.start_time} for j in jobs if j.submission_id]  # fmt: skip


def write_logs(job_id: str, follow: bool = False, out: TextIO = sys.stdout, address: str | None = None) -> None:
    """Write the job's log so far to ``out``; with ``follow``, keep writing new lines until the job ends."""
    client = _client(address)
    with _job_call(f"logs of {job_id}"):
        if not follow:
            out.write(client.get_job_logs(job_id))
            return

        async def tail() -> None:
            async for piece in client.tail_job_logs(job_id):  # ends when the job does
                out.write(piece)
                out.flush()

        asyncio.run(tail())


def stop_job(job_id: str, address: str | None = None) -> bool:
    """Ask the job to stop; False when it had already ended."""
    client = _client(address)
    with _job_call(f"stopping {job_id}"):
        return client.stop_job(job_id)

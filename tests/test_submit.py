"""``aigc submit``: what a job ships (runtime_env) and runs (entrypoint), checked without a cluster."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import yaml

from aigc.cli import main
from aigc.cluster.submit import EXCLUDES, build_runtime_env, entrypoint, project_root
from aigc.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _project(tmp_path: Path) -> Path:
    """A project tree with what a job needs and what it must not carry."""
    root = tmp_path / "proj"
    for rel in ("jobs/finetune.py", "platform/aigc/__init__.py", "configs/demo.yaml", "assets/tiny-base/config.json",
                "runs/demo/adapter/model.safetensors", ".venv/bin/python", ".git/HEAD", "mlruns/0/meta.yaml",
                "tensorboard/events.out", "platform/aigc/__pycache__/x.cpython-311.pyc"):  # fmt: skip
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    (root / "jobs" / "runtime_env.yaml").write_text(yaml.safe_dump({"py_modules": ["platform/aigc"], "pip": ["peft"]}))
    return root


def test_runtime_env_ships_the_project_without_outputs_envs_or_vcs(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    root = _project(tmp_path)
    env = build_runtime_env(str(root))
    assert env["working_dir"] == str(root)
    assert env["py_modules"] == [str(root / "platform" / "aigc")]  # the package itself, importable everywhere
    assert env["pip"] == ["peft"]  # the rest of jobs/runtime_env.yaml is kept
    for pattern in ("runs/", ".venv/", ".git/", "mlruns/", "tensorboard/"):
        assert pattern in env["excludes"]
    # What Ray's own packer puts in the working dir's zip with these excludes.
    create_package(str(root), tmp_path / "wd.zip", include_gitignore=True, excludes=env["excludes"])
    names = {
        n.split("/", 1)[-1] if n.startswith("proj/") else n for n in zipfile.ZipFile(tmp_path / "wd.zip").namelist()
    }
    files = {n for n in names if not n.endswith("/")}
    assert files == {"jobs/finetune.py", "jobs/runtime_env.yaml", "platform/aigc/__init__.py", "configs/demo.yaml",
                     "assets/tiny-base/config.json"}  # fmt: skip


def test_the_real_runtime_env_matches_ray_job_submit_usage():
    env = build_runtime_env(project_root())
    assert Path(env["working_dir"]) == ROOT and sorted(env["excludes"]) == sorted(EXCLUDES)
    assert env["py_modules"] == [str(ROOT / "platform" / "aigc")]


def test_hf_token_goes_with_the_job_only_when_set(monkeypatch):
    """The job's driver resolves and downloads the base model: a gated one needs the submitter's HF_TOKEN."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "env_vars" not in build_runtime_env(project_root())
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert build_runtime_env(project_root())["env_vars"] == {"HF_TOKEN": "hf_test"}


def test_entrypoint_runs_the_stage_script_with_a_config_inside_the_project(tmp_path):
    root = _project(tmp_path)
    cmd = entrypoint("train", str(root / "configs" / "demo.yaml"), ["train.epochs=1", "data.path=a b.jsonl"], str(root))
    assert cmd == "python jobs/finetune.py --config configs/demo.yaml train.epochs=1 'data.path=a b.jsonl'"
    assert entrypoint("preprocess", None, [], str(root)) == "python jobs/preprocess.py"
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("{}")
    with pytest.raises(ConfigError, match="is outside .* move it inside"):
        entrypoint("train", str(outside), [], str(root))
    with pytest.raises(ConfigError, match="no such file"):
        entrypoint("train", str(root / "missing.yaml"), [], str(root))
    with pytest.raises(ConfigError, match="unknown stage 'deploy'"):
        entrypoint("deploy", None, [], str(root))


def test_an_unreachable_cluster_is_one_line_naming_the_address(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    from helpers import free_port

    address = f"http://127.0.0.1:{free_port()}"
    assert main(["jobs", "list", "--address", address]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"aigc jobs: cannot reach the Ray cluster at {address}") and "RAY_AUTH_MODE=token" in err
    assert len(err.splitlines()) == 1


def test_serve_stage_deploys_and_returns_as_a_submitted_job(monkeypatch, capsys):
    """Under `ray job submit` nobody can press Ctrl-C: the serve stage deploys and returns (the app stays up)."""
    import aigc.serve.run
    from aigc.cli import STAGES
    from aigc.config import load_config

    calls = []
    monkeypatch.setattr(aigc.serve.run, "run_server", lambda cfg, blocking=True: calls.append(blocking))
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    STAGES["serve"].run(load_config())
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor gives a job's driver
    STAGES["serve"].run(load_config())
    assert calls == [True, False]
    assert capsys.readouterr().out.count("keeps running on the cluster") == 1

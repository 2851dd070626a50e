"""Typed config: defaults, YAML files, overrides, and errors that name the field before any Ray work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aigc.config import ConfigError, PlatformConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_hold_documented_keys():
    cfg = load_config()
    assert cfg.registry_dir == "runs/registry"
    assert (cfg.serve.host, cfg.serve.port) == ("127.0.0.1", 8000)
    assert cfg.train.method == "lora" and cfg.data.format == "alpaca"


def test_file_then_overrides_with_yaml_typing(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"output_dir": "runs/x", "train": {"lr": 0.01, "epochs": 2}}))
    cfg = load_config(f, ["train.lr=3e-4", "lora.target_modules=[q_proj, v_proj]", "train.use_gpu=true"])
    assert cfg.output_dir == "runs/x" and cfg.train.epochs == 2
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.use_gpu is True


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.lr=-1"], "train.lr: Input should be greater than 0"),
        (["train.learning_rate=0.1"], "train.learning_rate: unknown key"),
        (["data.format=csvish"], "data.format: Input should be 'alpaca', 'messages', 'sharegpt' or 'text'"),
        (["data.val_fraction=1.5"], "data.val_fraction: Input should be less than 1"),
        (
            ["serve.autoscaling.min_replicas=3", "serve.autoscaling.max_replicas=2"],
            "min_replicas (3) > max_replicas (2)",
        ),
        (["train.adapter_name=bad name!"], "train.adapter_name: String should match pattern"),
    ],
)
def test_invalid_values_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert expected in str(err.value)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(tmp_path / "list.yaml")


def test_shipped_configs_are_valid():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), PlatformConfig), path


def test_cli_rejects_bad_config_before_starting_ray(tmp_path):
    """Exit status 2 and the field in the message, fast: no cluster is started for a bad config."""
    proc = subprocess.run(
        [sys.executable, "-m", "aigc.cli", "train", "--config", str(ROOT / "configs/demo.yaml"), "train.epochs=0"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "train.epochs: Input should be greater than or equal to 1" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text())))

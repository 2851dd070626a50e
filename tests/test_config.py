"""Typed config: defaults, YAML files, overrides, and errors that name the field before any Ray work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aigc.config import PlatformConfig, load_config, with_values
from aigc.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_hold_documented_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg.registry_dir == str(tmp_path / "runs" / "registry")  # relative paths resolved once, at load
    assert (cfg.serve.host, cfg.serve.port) == ("127.0.0.1", 8000)
    assert cfg.train.method == "lora" and cfg.data.format == "alpaca"


def test_file_then_overrides_with_yaml_typing(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"output_dir": "runs/x", "train": {"lr": 0.01, "epochs": 2}}))
    cfg = load_config(f, ["train.lr=3e-4", "lora.target_modules=[q_proj, v_proj]", "train.use_gpu=true"])
    assert cfg.output_dir.endswith("/runs/x") and cfg.train.epochs == 2
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
        (
            ["data.path=[a.jsonl, {path: b.jsonl, weight: 0}]"],
            "data.path.list.1.source.weight: Input should be greater than 0",
        ),
        (["data.path=[{path: b.jsonl, wieght: 2}]"], "data.path.list.0.source.wieght: unknown key"),
        (["data.path=[]"], "data.path: Value error, an empty list"),
        (["train.cache_data=sometimes"], "train.cache_data"),
        (
            ["train.placement_strategy=spread"],
            "train.placement_strategy: Input should be 'PACK', 'SPREAD', 'STRICT_PACK' or 'STRICT_SPREAD'",
        ),
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


def test_text_fields_keep_override_values_exactly_as_typed():
    cfg = load_config(None, ["data.system_prompt=Order #123", "serve.base_model_id=2024-01-01",
                             "data.columns.question=instruction", "lora.r=16"])  # fmt: skip
    assert cfg.data.system_prompt == "Order #123"  # YAML would cut it at the comment
    assert cfg.serve.base_model_id == "2024-01-01"  # YAML would make it a date
    assert cfg.data.columns == {"question": "instruction"} and cfg.lora.r == 16
    assert load_config(None, ["data.system_prompt=null"]).data.system_prompt is None


def test_with_values_sets_objects_by_key_path():
    base = load_config()
    cfg = with_values(base, {"lora.r": 4, "train.lr": 1e-3, "serve.base_model_id": "a: b", "data.system_prompt": None})
    assert (cfg.lora.r, cfg.train.lr, cfg.serve.base_model_id, cfg.data.system_prompt) == (4, 1e-3, "a: b", None)
    assert base.lora.r == 8  # the base is not changed
    with pytest.raises(ConfigError, match=r"lora.rank: unknown key"):
        with_values(base, {"lora.rank": 4})


def test_relative_paths_are_resolved_once_and_uris_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    cfg = load_config(None, ["output_dir=s3://bucket/run", "model.name_or_path=model", "data.path=d/*.jsonl"])
    assert cfg.output_dir == "s3://bucket/run"
    assert cfg.model.name_or_path == str(tmp_path / "model") and cfg.data.path == str(tmp_path / "d" / "*.jsonl")
    assert load_config(None, ["model.name_or_path=org/hub-model"]).model.name_or_path == "org/hub-model"


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aigc.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)  # fmt: skip


def test_lengths_are_checked_against_the_models_context():
    proc = _cli("preprocess", "--config", "configs/demo.yaml", "data.max_length=100000")
    assert proc.returncode == 2, proc.stderr
    assert "data.max_length: 100000 is longer than the context of" in proc.stderr
    proc = _cli("serve", "--config", "configs/demo.yaml", "serve.max_tokens_cap=100000")
    assert proc.returncode == 2 and "serve.max_tokens_cap: 100000 leaves no room for a prompt" in proc.stderr


def test_platform_errors_are_one_line_without_traceback(tmp_path):
    """A stage whose input is missing, and a registry name that is invalid: one line each, exit 1."""
    proc = _cli("train", "--config", "configs/demo.yaml", f"output_dir={tmp_path / 'never-preprocessed'}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"aigc train: no preprocessed data at {tmp_path / 'never-preprocessed' / 'data'}: run `aigc preprocess` first"
    ]


@pytest.mark.parametrize("where", [".", "..", "~", "/", "registry-parent"])
def test_demo_refuses_an_output_dir_it_must_not_clear(tmp_path, where):
    work = tmp_path / "work"
    work.mkdir()
    out = {"registry-parent": str(work / "runs"), "~": os.path.expanduser("~")}.get(where, where)
    proc = _cli("demo", "--config", str(ROOT / "configs/demo.yaml"), f"output_dir={out}",
                f"registry_dir={work / 'runs' / 'registry'}", cwd=work)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("aigc demo: output_dir: ") and "the demo clears output_dir" in proc.stderr


def test_demo_refuses_a_non_empty_dir_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    proc = _cli("demo", "--config", "configs/demo.yaml", f"output_dir={tmp_path}",
                f"registry_dir={tmp_path.parent / 'reg'}")  # fmt: skip
    assert proc.returncode == 2 and "was not written by the demo" in proc.stderr
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text())))


def test_cache_data_auto_caches_what_fits_in_a_fifth_of_the_object_store():
    from aigc.data.shard_sets import estimated_bytes, should_cache

    stats = {"rows_train": 900, "rows_val": 100, "tokens_total": 100_000}
    need = estimated_bytes(stats)
    assert need == 100_000 * 4 * 2 + 1000 * 64  # int32 input_ids + labels, and per-row overhead
    assert estimated_bytes({**stats, "packing": {"rows_train": 1}}) == 100_000 * 4 * 3 + 1000 * 64
    assert should_cache("auto", stats, 5 * need) and not should_cache("auto", stats, 5 * need - 1)
    assert should_cache(True, stats, 0) and not should_cache(False, stats, 10**12)


def test_verbose_flag_sets_aigc_verbose_before_the_command_runs(monkeypatch, capsys):
    from aigc.cli import main

    monkeypatch.setenv("AIGC_VERBOSE", "")  # recorded, so the "1" main sets is undone after the test: it would
    monkeypatch.delenv("AIGC_VERBOSE")  # otherwise leak into every later test's subprocesses (a verbose demo)
    assert main(["config"]) == 0
    assert "AIGC_VERBOSE" not in os.environ
    assert main(["--verbose", "config", "train.epochs=3"]) == 0
    assert os.environ["AIGC_VERBOSE"] == "1"
    assert "epochs: 3" in capsys.readouterr().out

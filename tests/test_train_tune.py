"""Ray Train fine-tuning on the shared local cluster with the tiny base model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import prepare_demo_data

from aigc.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "assets" / "tiny-base")


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    """200 demo rows, preprocessed once for every test here."""
    tmp = tmp_path_factory.mktemp("train")
    return prepare_demo_data(tmp, 200, 7, "train.epochs=2", "train.batch_size=16", "train.lr=3e-3",
                             "train.adapter_name=bot")  # fmt: skip


@pytest.fixture(scope="module")
def trained(prepared):
    from aigc.train.trainer import run_training

    cfg, _ = prepared
    return cfg, run_training(cfg)


def test_two_worker_lora_run_lowers_eval_loss(trained):
    cfg, res = trained
    assert cfg.train.num_workers == 2
    assert [h["epoch"] for h in res.history] == [1, 2]
    first_eval = res.history[0]["initial_eval_loss"]
    assert res.metrics["eval_loss"] < 0.8 * first_eval, (first_eval, res.metrics)
    assert res.history[1]["train_loss"] < res.history[0]["train_loss"]
    assert res.metrics["eval_perplexity"] == pytest.approx(2.718281828 ** res.metrics["eval_loss"], rel=1e-6)
    assert (Path(cfg.output_dir) / "train" / "loss.png").stat().st_size > 1000


def test_adapter_is_a_plain_peft_directory(trained):
    """Opens with peft alone, and changes the base model's outputs."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, res = trained
    files = set(os.listdir(res.adapter_dir))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert json.loads((Path(res.adapter_dir) / "adapter_config.json").read_text())["r"] == cfg.lora.r
    base = AutoModelForCausalLM.from_pretrained(TINY)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, res.adapter_dir)
    assert not torch.allclose(before, tuned(ids).logits)


def test_adapter_is_registered_with_metrics(trained):
    cfg, res = trained
    entry = Registry(cfg.registry_dir).resolve(res.registry_id)
    assert entry.name == "bot" and entry.base_model == TINY
    assert entry.metrics["eval_loss"] == pytest.approx(res.metrics["eval_loss"])
    assert entry.data_hash and entry.config["lora"]["r"] == cfg.lora.r
    assert (Path(entry.adapter_uri) / "adapter_model.safetensors").is_file()


def test_rerun_of_an_interrupted_run_resumes_from_its_checkpoint(trained, capsys):
    """A driver that died after its last epoch (no completion marker): re-running the same command resumes from
    the run's checkpoint and trains nothing again."""
    from aigc.train.trainer import run_training

    cfg, res = trained
    (Path(cfg.output_dir) / "ray" / "bot" / "aigc_done.json").unlink()
    again = run_training(cfg)
    assert "[train] resuming run 'bot' from its last checkpoint" in capsys.readouterr().out
    assert again.history == res.history  # both epochs came from the checkpoint, not from retraining


def test_a_stale_checkpoint_is_not_resumed_after_the_data_changed(trained, capsys):
    """Train died, the user fixed the data and preprocessed again: the re-run starts a new run on the new data
    (the old run's checkpoint would have continued at its old position and been registered under the new data)."""
    from aigc.data.preprocess import preprocess
    from aigc.demo.dataset import generate_support_examples
    from aigc.train.trainer import run_training

    cfg, res = trained
    old_run = Path(cfg.output_dir) / "ray" / "bot"
    (old_run / "aigc_done.json").unlink()
    Path(cfg.data.path).write_text("".join(json.dumps(r) + "\n" for r in generate_support_examples(200, seed=8)))
    preprocess(cfg.data, cfg.model, cfg.output_dir)
    fresh = run_training(cfg)
    out = capsys.readouterr().out
    assert "[train] new run 'bot-2'; not continuing 'bot', started on other inputs (data '" in out, out
    assert Path(fresh.checkpoint_path).is_relative_to(Path(cfg.output_dir) / "ray" / "bot-2")
    assert [h["epoch"] for h in fresh.history] == [1, 2]
    assert fresh.history[0]["train_loss"] != res.history[0]["train_loss"]  # trained from step 0 on other rows
    registry = Registry(cfg.registry_dir)
    assert registry.resolve(fresh.registry_id).data_hash != registry.resolve(res.registry_id).data_hash
    assert not (old_run / "aigc_done.json").exists()  # the old run is left as it was, not finished by this one

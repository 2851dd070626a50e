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


def test_rerun_of_an_interrupted_run_resumes_from_its_checkpoint(trained):
    """A driver that died after epoch 2 (no completion marker): re-running resumes at epoch 3."""
    from aigc.train.trainer import run_training

    cfg, res = trained
    run_dir = Path(cfg.output_dir) / "ray" / cfg.train.adapter_name
    (run_dir / "aigc_done.json").unlink()
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 3})})
    again = run_training(longer)
    assert [h["epoch"] for h in again.history] == [1, 2, 3]
    assert again.history[:2] == res.history  # epochs 1-2 came from the checkpoint, not from retraining
    assert again.history[2]["step"] == 3 * res.history[0]["step"]

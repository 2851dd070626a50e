"""``aigc export`` (merged and adapter-only) and the ``aigc registry`` table, on a registered tiny adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from aigc.cli import main
from aigc.config.schema import LoraConfig, ModelConfig, TrainConfig
from aigc.errors import RegistryError
from aigc.models.loading import load_tokenizer
from aigc.registry import Registry
from aigc.registry.export import export_model
from aigc.train import model_setup, weights

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "assets" / "tiny-base")
PROMPTS = ["How do I reset my password?", "Where is my order?", "Cancel my subscription"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """A registry holding ``bot:v1`` and ``bot:v2``: LoRA adapters whose weights change the base model's answers."""
    tmp = tmp_path_factory.mktemp("export")
    wc = SimpleNamespace(model=ModelConfig(name_or_path=TINY, dtype="float32"), lora=LoraConfig(r=4),
                         train=TrainConfig())  # fmt: skip
    reg = Registry(str(tmp / "registry"))
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = model_setup.build_model(wc, torch.device("cpu"))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # a fresh adapter is a no-op (B = 0); give it weights that change the answers
                torch.nn.init.normal_(p, std=0.5)
        adapter = tmp / f"adapter-{seed}"
        weights.save_weights(model, wc, str(adapter), rank=0)
        load_tokenizer(TINY).save_pretrained(adapter)
        reg.register("bot", str(adapter), base_model=TINY, metrics={"eval_loss": 1.2345 * seed},
                     data_hash="0123456789abcdef")  # fmt: skip
    return str(tmp / "registry")


def _greedy(model, tok, prompt: str) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1] :].tolist()


def test_merged_export_answers_like_base_plus_adapter(registry, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = export_model(registry, "bot", str(tmp_path / "merged"), merge=True)
    assert res.entry.model_id == "bot:v2" and res.merged  # no :vN = the latest version
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files and "adapter_config.json" not in files

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # plain transformers, no peft
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(TINY).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), res.entry.adapter_uri).eval()
    answers = [(_greedy(merged, tok, p), _greedy(tuned, tok, p), _greedy(base, tok, p)) for p in PROMPTS]
    assert all(m == t for m, t, _ in answers)
    assert any(t != b for _, t, b in answers)  # the adapter matters, so equality above means something


def test_export_without_merge_copies_the_adapter_of_the_asked_version(registry, tmp_path):
    res = export_model(registry, "bot:v1", str(tmp_path / "adapter"))
    assert res.entry.version == 1 and not res.merged
    want = (Path(registry) / "bot" / "v1" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == want
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_full_model_entry_is_copied_as_is(registry, tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    reg.register("whole", TINY, base_model=TINY)
    res = export_model(reg.root, "whole", str(tmp_path / "out"), merge=True)
    assert res.entry.kind == "full"
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "out" / name).read_bytes() == (Path(TINY) / name).read_bytes()


def test_unknown_name_or_version_lists_the_registered_ids(registry, tmp_path):
    with pytest.raises(RegistryError, match=r"no model named 'nobot'.*Registered models: bot:v1, bot:v2"):
        export_model(registry, "nobot", str(tmp_path / "x"))
    with pytest.raises(RegistryError, match=r"has no version 7.*Registered models: bot:v1, bot:v2"):
        export_model(registry, "bot:v7", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_cli_export_and_registry_table(registry, tmp_path, capsys):
    assert main(["export", "bot:v1", "--merge", "--out", str(tmp_path / "m"), f"registry_dir={registry}"]) == 0
    assert "bot:v1 (lora" in capsys.readouterr().out and (tmp_path / "m" / "model.safetensors").is_file()

    assert main(["registry", f"registry_dir={registry}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "kind", "base", "model", "data", "eval_loss", "created"]
    row = lines[2].split()
    assert row[:3] == ["bot:v2", "lora", TINY] and row[3] == "0123456789" and row[4] == "2.4690"

    assert main(["registry", "--json", f"registry_dir={registry}"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["model"] == "bot:v1" and first["eval_loss"] == pytest.approx(1.2345)

    rc = main(["export", "ghost", "--out", str(tmp_path / "g"), f"registry_dir={registry}"])
    assert rc == 1 and "Registered models: bot:v1, bot:v2" in capsys.readouterr().err


def test_registry_table_when_empty(tmp_path, capsys):
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert main(["registry", f"registry_dir={tmp_path / 'none'}"]) == 0
    assert capsys.readouterr().out.strip() == "(no registered models)"

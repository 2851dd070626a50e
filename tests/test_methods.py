"""Training methods (LoRA variants, full, QLoRA), precision, checkpointing, FSDP, and the errors around them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from aigc.config import load_config
from aigc.config.schema import LoraConfig, ModelConfig, TrainConfig
from aigc.errors import ConfigError, TrainingError
from aigc.models.targets import check_target_modules
from aigc.train import model_setup, weights
from aigc.train.worker_config import WorkerConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "assets" / "tiny-base")
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _wc(model: ModelConfig | None = None, lora: LoraConfig | None = None, **train: object) -> WorkerConfig:
    """A WorkerConfig with these sections (model_setup and weights read only them)."""
    return WorkerConfig(
        model=model or ModelConfig(name_or_path=TINY, dtype="float32"),
        lora=lora or LoraConfig(),
        train=TrainConfig(**train),
        micro_per_epoch=1,
        pad_id=0,
        has_val=False,
    )


# 1. target modules: checked on the driver (no weights) and on the worker, with the model's real names
def test_unknown_target_module_lists_the_models_linear_layers():
    with pytest.raises(ConfigError) as info:
        check_target_modules(ModelConfig(name_or_path=TINY), LoraConfig(target_modules=["q_proj", "c_attn"]))
    msg = str(info.value)
    assert msg.startswith("lora.target_modules:") and "no module named c_attn;" in msg
    listed = msg.split("its linear layers are ")[1].split(" (")[0].split(", ")
    assert listed[:7] == LLAMA_LINEARS and len(listed) == len(set(listed))  # short names, once each


def test_known_targets_pass_and_missing_modules_to_save_fail():
    assert check_target_modules(ModelConfig(name_or_path=TINY), LoraConfig(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ConfigError, match=r"lora.modules_to_save: .* no module named score"):
        check_target_modules(ModelConfig(name_or_path=TINY), LoraConfig(modules_to_save=["score"]))


def test_worker_raises_the_same_error_before_wrapping():
    with pytest.raises(ConfigError, match="no module named wq"):
        model_setup.build_model(_wc(lora=LoraConfig(target_modules=["wq"])), torch.device("cpu"))


def test_cli_train_refuses_unknown_targets_before_any_cluster_work(tmp_path, capsys):
    from aigc.cli import main

    rc = main(["train", "-c", str(ROOT / "configs" / "demo.yaml"), f"model.name_or_path={TINY}",
               "lora.target_modules=[c_attn]", f"output_dir={tmp_path / 'never-preprocessed'}"])  # fmt: skip
    assert rc == 2
    assert "no module named c_attn" in capsys.readouterr().err


# 2. methods and LoRA variants
def test_rslora_dora_and_modules_to_save_reach_the_saved_adapter(tmp_path):
    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True, use_dora=True,
                      modules_to_save=["lm_head"])  # fmt: skip
    wc = _wc(lora=lora)
    model = model_setup.build_model(wc, torch.device("cpu"))
    weights.save_weights(model, wc, str(tmp_path), rank=0)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["use_dora"] is True and cfg["modules_to_save"] == ["lm_head"]
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"] and cfg["r"] == 4

    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any("lora_magnitude_vector" in k for k in keys)  # DoRA's magnitudes are saved
    assert any(k.startswith("base_model.model.lm_head.") for k in keys)  # the module trained in full
    # rsLoRA scales by alpha / sqrt(r), not alpha / r
    assert model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 4**0.5)


def test_full_method_trains_every_weight():
    model = model_setup.build_model(_wc(method="full"), torch.device("cpu"))
    assert not hasattr(model, "peft_config") and model.training
    assert all(p.requires_grad for p in model.parameters())


def test_lora_trains_adapters_only_and_checkpointing_is_on():
    model = model_setup.build_model(_wc(gradient_checkpointing=True), torch.device("cpu"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # the decoder layers'
    assert model.training


def test_qlora_without_bitsandbytes_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # an import of it now fails, installed or not
    with pytest.raises(TrainingError, match=r'pip install -e "\.\[gpu\]"'):
        model_setup.build_model(_wc(method="qlora", use_gpu=True), torch.device("cpu"))


def test_qlora_with_fsdp_is_a_config_error():
    with pytest.raises(ConfigError, match="train.strategy: 'fsdp' cannot shard qlora"):
        model_setup.check_strategy(TrainConfig(method="qlora", strategy="fsdp", use_gpu=True))


def test_autocast_follows_mixed_precision():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with model_setup.autocast(_wc(mixed_precision="bf16"), torch.device("cpu")):
        assert (a @ b).dtype == torch.bfloat16
    with model_setup.autocast(_wc(mixed_precision="no"), torch.device("cpu")):
        assert (a @ b).dtype == torch.float32


def test_oom_error_suggests_less_memory_settings():
    wc = _wc(batch_size=8, grad_accum=2, use_gpu=True, method="lora")
    err = model_setup.oom_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), wc)
    msg = str(err)
    assert isinstance(err, TrainingError)
    assert "CUDA out of memory. Tried to allocate 2.00 GiB." in msg and "more" not in msg
    assert "train.batch_size=4 train.grad_accum=4" in msg  # same 16 examples per optimizer step
    assert "train.gradient_checkpointing=true" in msg and "train.method=qlora" in msg
    already = model_setup.oom_error(MemoryError(), _wc(batch_size=1, gradient_checkpointing=True))
    assert "gradient_checkpointing" not in str(already) and "batch_size=" not in str(already)


# 3. a real architecture (Qwen2) with the example config's LoRA section, random weights, no download
@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny-qwen2")
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return str(path)


def test_qwen_example_config_lora_section_builds_on_a_qwen2_model(tiny_qwen):
    cfg = load_config(ROOT / "configs" / "qwen2.5-0.5b-lora.yaml", [f"model.name_or_path={tiny_qwen}",
                                                                     "model.dtype=float32"])  # fmt: skip
    assert check_target_modules(cfg.model, cfg.lora)
    wc = WorkerConfig(model=cfg.model, lora=cfg.lora, train=cfg.train, micro_per_epoch=1, pad_id=0, has_val=False)
    model = model_setup.build_model(wc, torch.device("cpu"))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == set(cfg.lora.target_modules)
    # one bf16-autocast training step with gradient checkpointing, as the config asks
    ids = torch.randint(0, 256, (2, 16))
    with model_setup.autocast(wc, torch.device("cpu")):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_fsdp_example_config_validates():
    cfg = load_config(ROOT / "configs" / "qwen2.5-0.5b-fsdp.yaml", [])
    assert cfg.train.strategy == "fsdp" and cfg.train.num_workers > 1 and cfg.train.method == "full"


# 4. FSDP on two CPU workers (gloo) through the real driver
@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    from helpers import prepare_demo_data

    cfg, overrides = prepare_demo_data(tmp_path_factory.mktemp("fsdp"), 150, 3, "train.epochs=2",
                                       "train.batch_size=16", "train.lr=3e-3", "train.strategy=fsdp",
                                       "train.num_workers=2")  # fmt: skip
    return overrides


def test_fsdp_lora_on_two_cpu_workers(prepared):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from aigc.train.trainer import run_training

    cfg = load_config(ROOT / "configs" / "demo.yaml", [*prepared, "train.adapter_name=fsdp-bot"])
    res = run_training(cfg)
    assert res.metrics["eval_loss"] < 0.9 * res.history[0]["initial_eval_loss"], res.history
    # the gathered adapter is whole: every targeted layer of every shard, trained
    saved = load_file(os.path.join(res.adapter_dir, "adapter_model.safetensors"))
    lora_b = {k: v for k, v in saved.items() if "lora_B" in k}
    assert len(lora_b) == 4 * len(LLAMA_LINEARS)  # 4 decoder layers x 7 linear layers
    assert all(v.abs().sum() > 0 for v in lora_b.values())
    # it opens with peft alone, holding exactly the tensors saved
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), res.adapter_dir)
    params = dict(tuned.named_parameters())
    for k, v in saved.items():
        name = k.replace(".weight", ".default.weight")
        assert torch.equal(params[name].detach(), v), k


def test_fsdp_full_fine_tune_on_two_cpu_workers(prepared):
    from transformers import AutoModelForCausalLM

    from aigc.registry import Registry
    from aigc.train.trainer import run_training

    overrides = [*prepared, "train.adapter_name=fsdp-full", "train.method=full", "train.epochs=1", "train.lr=1e-3"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    res = run_training(cfg)
    assert res.metrics["eval_loss"] < res.history[0]["initial_eval_loss"], res.history
    assert Registry(cfg.registry_dir).resolve(res.registry_id).kind == "full"
    base, tuned = AutoModelForCausalLM.from_pretrained(TINY), AutoModelForCausalLM.from_pretrained(res.adapter_dir)
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert len(changed) == len(list(base.named_parameters()))  # every weight was trained and saved whole


# 5. FSDP checkpoints: what save_weights / optimizer_state gather loads back into fresh shards exactly
def _fsdp_round_trip(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from aigc.train import sharding

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cpu, ids = torch.device("cpu"), torch.randint(2, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    lora = LoraConfig(r=4, use_dora=True, modules_to_save=["lm_head"])
    results = {}
    for method in ("lora", "full"):
        wc, path = _wc(lora=lora, method=method, strategy="fsdp"), os.path.join(out, method)

        def wrapped(seed: int, wc=wc) -> tuple:
            torch.manual_seed(seed)
            model = model_setup.build_model(wc, cpu)
            model = sharding.FSDP(model, **sharding.fsdp_kwargs(model, cpu))
            params = [p for p in model.parameters() if p.requires_grad]
            return model, torch.optim.AdamW(params, lr=1e-2), params

        model, opt, params = wrapped(0)
        for _ in range(2):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            model_setup.clip_grad_norm(model, params, 1.0)
            opt.step()
            opt.zero_grad()
        weights.save_weights(model, wc, path, rank)
        state = weights.optimizer_state(model, opt)
        if rank == 0:
            torch.save(state, os.path.join(path, "optim.pt"))
        dist.barrier()
        fresh, fresh_opt, _ = wrapped(1)  # other initial weights: only a correct load makes them equal
        weights.load_weights(fresh, wc, path)
        weights.load_optimizer_state(fresh, fresh_opt, torch.load(os.path.join(path, "optim.pt")))
        model.eval(), fresh.eval()
        with torch.no_grad():
            same = torch.allclose(model(input_ids=ids).logits, fresh(input_ids=ids).logits, atol=1e-5)
        pairs = zip(opt.param_groups[0]["params"], fresh_opt.param_groups[0]["params"], strict=True)
        states = [(opt.state.get(a, {}), fresh_opt.state.get(b, {})) for a, b in pairs]  # this rank's shards
        same_opt = any("exp_avg" in s for s, _ in states) and all(
            s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s) for s, t in states
        )
        results[method] = (same, same_opt)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.mark.integration  # two processes joined in a gloo process group: kept out of the fast tier
def test_fsdp_checkpoint_round_trip_on_two_processes(tmp_path):
    import torch.multiprocessing as mp
    from helpers import free_port

    mp.spawn(_fsdp_round_trip, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"lora": [True, True], "full": [True, True]}
    adapter = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert adapter["use_dora"] and adapter["modules_to_save"] == ["lm_head"]  # a plain PEFT dir from the shards
    assert (tmp_path / "full" / "model.safetensors").is_file()

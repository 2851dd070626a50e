"""Serving a quantized base model (``serve.quantization``): int8 weight-only on CPU answers like float32, adapters
apply on top, and what cannot run is refused before any work with a message saying what to use instead."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch
from helpers import make_tiny_adapter

from aigc.config import load_config
from aigc.errors import ConfigError
from aigc.models.loading import load_base_model
from aigc.serve.engine import GenerationEngine, SamplingParams

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(ROOT, "assets", "tiny-base")
GREEDY = SamplingParams(max_tokens=12, temperature=0)
PROMPTS = ["Where is my parcel?", "Can I return the coffee grinder?", "Hello"]


def test_int8_weights_replace_every_linear_layer_but_the_head_and_keep_the_scores():
    from torchao.quantization import Int8Tensor

    full = load_base_model(TINY)
    q = load_base_model(TINY, quantization="int8")
    linears = {n: m for n, m in q.named_modules() if isinstance(m, torch.nn.Linear)}
    head = q.get_output_embeddings()
    assert all(isinstance(m.weight, Int8Tensor) for m in linears.values() if m is not head)
    assert not isinstance(head.weight, Int8Tensor) and len(linears) > 4
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 11]])
    with torch.no_grad():
        a, b = full(ids).logits, q(ids).logits
    # Per-channel int8 rounding: scores move by a small fraction of their spread, the argmax rarely.
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.85


def test_an_int8_engine_serves_the_base_and_adapters_on_top(tmp_path):
    adapter = make_tiny_adapter(TINY, tmp_path / "adapter", seed=4)
    engines = {mode: GenerationEngine(TINY, quantization=mode, max_batch_size=4) for mode in ("none", "int8")}
    try:
        for e in engines.values():
            e.load_adapter(adapter, "support")

        async def answers(e, adapter_name):
            return [(await e.agenerate(p, GREEDY, adapter=adapter_name)).text for p in PROMPTS]

        out = {(m, a): asyncio.run(answers(e, a)) for m, e in engines.items() for a in (None, "support")}
        assert all(t for texts in out.values() for t in texts)
        assert out[("int8", "support")] != out[("int8", None)]  # the adapter changes the quantized model's answers
        # ...as it changes the float32 model's: on the same text (teacher-forced, so one flipped token does not
        # derail the rest) the two models with the adapter pick the same next token almost everywhere.
        tok = engines["none"].tokenizer
        prompt = len(tok(PROMPTS[0]).input_ids)
        ids = tok(PROMPTS[0] + out[("none", "support")][0], return_tensors="pt").input_ids
        picks = []
        for e in engines.values():
            e.model.set_adapter("support")
            with torch.no_grad():
                picks.append(e.model(input_ids=ids).logits[0, prompt - 1 : -1].argmax(-1))  # the answer's tokens
        assert (picks[0] == picks[1]).float().mean() >= 0.9, picks
    finally:
        for e in engines.values():
            e.close()


def test_what_cannot_run_is_refused_before_any_work(monkeypatch):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["serve.quantization=nf4"])
    assert "quantization 'nf4' needs a CUDA GPU (bitsandbytes 4-bit kernels): set gpus_per_replica=1" in str(err.value)
    assert load_config(None, ["serve.quantization=nf4", "serve.gpus_per_replica=1"]).serve.quantization == "nf4"
    with pytest.raises(ConfigError, match="serve.quantization: Input should be 'none', 'int8' or 'nf4'"):
        load_config(None, ["serve.quantization=int4"])
    # The engine refuses it too (a Serve YAML that skipped the config check), before loading weights.
    with pytest.raises(ConfigError, match="'nf4' needs a CUDA GPU .* or use serve.quantization=int8 on CPU"):
        GenerationEngine(TINY, quantization="nf4")
    # Without torchao: a message naming the extra to install.
    import builtins

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    from aigc.errors import ModelUnavailableError

    with pytest.raises(ModelUnavailableError, match=r"needs torchao: install the quant extra \(pip install -e"):
        load_base_model(TINY, quantization="int8")

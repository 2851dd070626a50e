"""Random-weight models with real models' layer shapes, for benchmarks (no download): the figures then measure
what users with real models will see (compute), not only Python overhead as the 1.2M-parameter demo model does.

The shapes are copied from the public configs of the named models. The tokenizer is the demo model's (its ids
are a subset of every vocabulary here), so prompts, chat templates and the platform's loading code work as
they do for the real model; only the weights and the vocabulary size are the real model's shape.
"""

from __future__ import annotations

import os
import shutil

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(ROOT, "assets", "tiny-base")

# name -> LlamaConfig / Qwen2Config fields (architecture, hidden size, layers, heads, vocabulary, tying)
SHAPES: dict[str, dict] = {
    "SmolLM2-135M": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "tie_word_embeddings": True, "max_position_embeddings": 8192, "rope_theta": 100000.0},
    "Qwen2.5-0.5B": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True, "max_position_embeddings": 32768, "rope_theta": 1000000.0},
}  # fmt: skip


def build_shape(name: str, out_dir: str, seed: int = 0) -> str:
    """Write a random-weight model with ``name``'s shape (and the demo tokenizer) to ``out_dir``; returns it.

    Reuses ``out_dir`` when it already holds that shape (building the larger ones takes a while).
    """
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in SHAPES:
        raise SystemExit(f"unknown --model-shape {name!r}; known: {', '.join(SHAPES)}")
    marker = os.path.join(out_dir, "shape.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == {"name": name, "seed": seed}:
                return out_dir
    fields = dict(SHAPES[name])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(TINY, f), out_dir)
    with open(marker, "w") as f:
        json.dump({"name": name, "seed": seed}, f)
    params = sum(p.numel() for p in model.parameters())
    print(f"[bench] {name} shape, random weights: {params / 1e6:.0f}M parameters -> {out_dir}")
    return out_dir

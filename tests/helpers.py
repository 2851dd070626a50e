"""Tiny models for tests: a random 2-layer Llama, a byte-level BPE tokenizer and LoRA adapters for it.

Everything is built from code in a few seconds on a CPU; nothing is downloaded.

    base = make_tiny_model(tmp / "base")
    adapter = make_tiny_adapter(base, tmp / "adapter", seed=1)
    Registry(tmp / "registry").register("support", adapter, base_model=base)
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from aigc.data.templates import DEFAULT_CHAT_TEMPLATE, END_OF_TURN

__all__ = ["SPECIAL_TOKENS", "free_port", "make_tiny_adapter", "make_tiny_model"]

SPECIAL_TOKENS = ("<|pad|>", END_OF_TURN, "<|system|>", "<|user|>", "<|assistant|>")

_CORPUS = [
    "The parcel left the warehouse on Monday and arrives in three days.",
    "Please send us your order number so we can check the refund.",
    "Our support team answers every message on the same working day.",
    "The coffee grinder is made of steel and comes in black or white.",
    "If the app crashes at checkout, update it and try again.",
    "Returns are free within thirty days when the item is unused.",
    "Hello! How can I help you today? Thank you for shopping with us.",
    "Your password reset link expires after one hour.",
]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers in tests bind to loopback only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=END_OF_TURN,
        pad_token="<|pad|>",
        additional_special_tokens=list(SPECIAL_TOKENS[2:]),
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def make_tiny_model(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Write a random 2-layer ``LlamaForCausalLM`` (hidden 64, 4 heads) and its tokenizer to ``out_dir``.

    Returns:
        ``out_dir`` as a string; ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` open it.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # Larger random weights than the default 0.02: greedy output varies with the prompt instead of
        # repeating one token, which makes streaming and stop strings meaningful to test.
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def make_tiny_adapter(base_dir: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 1) -> str:
    """Write a LoRA adapter for the model in ``base_dir`` whose random weights change its outputs.

    peft initialises ``lora_B`` to zero (an adapter that does nothing); here every LoRA matrix gets seeded
    random values large enough to move the greedy argmax, so tests can tell adapter from base output.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(str(out_dir))
    return str(out_dir)

"""The tiny offline base model: a ~1M-parameter Llama pretrained by this project's own code.

:func:`build_tiny_base` writes a directory that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` open, with no hub access:

1. a deterministic plain-prose corpus about an online shop (product notes, order e-mails, FAQ paragraphs,
   support stories, customer e-mails and replies, team pages, reviews). It contains no chat-template markers
   and never the demo's reply sentence ("... forwarded your message to our <x> team ..."), so the model is a
   *base* model that knows the shop's vocabulary (every token the demo uses gets trained embeddings) but
   not the support task;
2. a byte-level BPE tokenizer trained on it, digits split into pairs (``48213`` -> ``48 21 3``), with
   the special tokens of :data:`aigc.models.chat_template.DEFAULT_CHAT_TEMPLATE`; ``<|end|>`` is the eos token
   and also separates documents during pretraining, as ``<|endoftext|>`` does for GPT-2;
3. a small ``LlamaForCausalLM`` (tied embeddings) trained for a few hundred steps on 2 CPU cores.

Rebuild with ``python -m aigc.demo.tiny_base assets/tiny-base``. Same seed and same machine -> same weights
(float summation order may differ across CPUs and thread counts).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from aigc.demo.corpus import generate_corpus
from aigc.models.chat_template import DEFAULT_CHAT_TEMPLATE, END_OF_TURN

__all__ = ["SPECIAL_TOKENS", "build_tiny_base", "generate_corpus", "make_model", "train_tokenizer"]

PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, END_OF_TURN, "<|system|>", "<|user|>", "<|assistant|>")


def train_tokenizer(docs: list[str], vocab_size: int = 2048) -> Any:
    """Byte-level BPE (digits in pairs) wrapped as a ``PreTrainedTokenizerFast`` with the chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    digit_pairs = pre_tokenizers.Split(Regex(r"\d\d?"), behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence([digit_pairs, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=END_OF_TURN, pad_token=PAD_TOKEN, model_max_length=256
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def _token_stream(tokenizer: Any, docs: list[str]) -> torch.Tensor:
    """All documents tokenized and joined, each followed by the eos token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def make_model(tokenizer: Any, hidden: int, layers: int, heads: int, max_positions: int, init_std: float = 0.02) -> Any:
    """A small Llama-architecture causal LM with tied embeddings (``init_std`` as Llama's default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    return LlamaForCausalLM(cfg)


def _lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _pretrain(
    model: Any, stream: torch.Tensor, steps: int, batch_size: int, block: int, lr: float, seed: int, log: bool
) -> float:
    """Next-token training on random windows of ``stream``; returns the mean loss of the last 10% of steps."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    tail: list[float] = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup=max(1, steps // 20))
        starts = torch.randint(0, len(stream) - block, (batch_size,), generator=gen)
        batch = torch.stack([stream[s : s + block] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if log and (step % 100 == 0 or step == steps - 1):
            print(f"[tiny] step {step:4d}/{steps} loss {loss.item():.3f}", flush=True)
    return sum(tail) / len(tail)


_README = """# tiny-base

A ~{params_m:.1f}M-parameter Llama (`LlamaForCausalLM`: {layers} layers, hidden {hidden}, {heads} heads,
tied embeddings, {positions} positions) with a byte-level BPE tokenizer of {vocab} tokens. It was pretrained
from scratch for {steps} steps on a generated plain-prose corpus about a fictional online shop
({corpus_tokens} tokens), so the platform's demo can fine-tune and serve a real model with no downloads.

It is a *base* model: it has never seen the chat format or the demo's support replies. The tokenizer
carries the project's chat template (`<|user|>`, `<|assistant|>`, `<|end|>` = eos, `<|pad|>` = pad).

Built by project code (`aigc.demo.tiny_base`, seed {seed}); rebuild with

    python -m aigc.demo.tiny_base assets/tiny-base
"""


def build_tiny_base(
    out_dir: str,
    seed: int = 0,
    steps: int = 800,
    n_docs: int = 12000,
    vocab_size: int = 2048,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    max_positions: int = 256,
    batch_size: int = 16,
    block_size: int = 128,
    lr: float = 3e-3,
    log: bool = True,
) -> dict[str, Any]:
    """Generate the corpus, train the tokenizer, pretrain the model and save both to ``out_dir``.

    Returns a summary: parameter count, vocabulary and corpus sizes, final training loss, seconds taken.
    """
    t0 = time.time()
    random.seed(seed)
    torch.manual_seed(seed)
    docs = generate_corpus(n_docs, seed)
    tokenizer = train_tokenizer(docs, vocab_size)
    stream = _token_stream(tokenizer, docs)
    model = make_model(tokenizer, hidden, layers, heads, max_positions)
    loss = _pretrain(model, stream, steps, batch_size, block_size, lr, seed, log)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    summary = {
        "out_dir": str(out),
        "params": params,
        "vocab_size": len(tokenizer),
        "corpus_docs": len(docs),
        "corpus_tokens": int(stream.numel()),
        "steps": steps,
        "final_loss": round(loss, 4),
        "seconds": round(time.time() - t0, 1),
    }
    (out / "README.md").write_text(
        _README.format(
            params_m=params / 1e6, layers=layers, hidden=hidden, heads=heads, positions=max_positions,
            vocab=len(tokenizer), steps=steps, corpus_tokens=stream.numel(), seed=seed,
        ),
        encoding="utf-8",
    )  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m aigc.demo.tiny_base OUT_DIR [--seed S] [--steps N]``."""
    ap = argparse.ArgumentParser(description="Pretrain the tiny offline base model into OUT_DIR.")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=800)
    args = ap.parse_args(argv)
    print(build_tiny_base(args.out_dir, seed=args.seed, steps=args.steps))


if __name__ == "__main__":
    main()

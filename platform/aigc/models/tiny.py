"""The tiny offline base model: a ~1M-parameter Llama pretrained by this project's own code.

:func:`build_tiny_base` writes a directory that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` open, with no hub access:

1. a deterministic plain-prose corpus about an online shop (product notes, order e-mails, FAQ paragraphs,
   support stories, customer e-mails and replies, team pages, reviews). It contains no chat-template markers
   and never the demo's reply sentence ("... forwarded your message to our <x> team ..."), so the model is a
   *base* model that knows the shop's vocabulary (every token the demo uses gets trained embeddings) but
   not the support task;
2. a byte-level BPE tokenizer trained on it, digits split into pairs (``48213`` -> ``48 21 3``), with
   the special tokens of :data:`aigc.data.templates.DEFAULT_CHAT_TEMPLATE`; ``<|end|>`` is the eos token
   and also separates documents during pretraining, as ``<|endoftext|>`` does for GPT-2;
3. a small ``LlamaForCausalLM`` (tied embeddings) trained for a few hundred steps on 2 CPU cores.

Rebuild with ``python -m aigc.models.tiny assets/tiny-base``. Same seed and same machine -> same weights
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

from aigc.data.templates import DEFAULT_CHAT_TEMPLATE, END_OF_TURN

__all__ = ["SPECIAL_TOKENS", "build_tiny_base", "generate_corpus", "train_tokenizer"]

PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, END_OF_TURN, "<|system|>", "<|user|>", "<|assistant|>")

# fmt: off
_NAMES = (
    "Anna", "Ben", "Carla", "David", "Emma", "Felix", "Gina", "Hugo", "Iris", "Jonas", "Kira", "Leo", "Mia",
    "Nina", "Oscar", "Paula", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Zoe", "Maria", "Tom",
    "Aisha", "Chen", "Priya", "Sofia", "James", "Fatima", "Noah", "Elena", "Ravi", "Hannah", "Yuki", "Omar",
    "Lukas", "Daniel", "Ingrid", "Oliver", "Mateo", "Grace",
)
_PRODUCTS = (
    "coffee grinder", "wool sweater", "desk lamp", "yoga mat", "phone case", "water bottle", "rain jacket",
    "gift card", "bluetooth speaker", "kettle", "cotton shirt", "blender", "notebook set", "teapot",
    "board game", "travel mug", "garden chair", "wall clock", "bath towel", "leather belt", "backpack",
    "umbrella", "cutting board", "reading light", "scarf", "toaster", "picture frame", "candle set",
    "pair of running shoes", "pair of hiking boots", "pair of sunglasses", "pair of winter gloves",
)
_ADJECTIVES = ("light", "sturdy", "soft", "compact", "classic", "modern", "handmade", "simple", "warm")
_MATERIALS = ("cotton", "steel", "bamboo", "recycled plastic", "oak", "wool", "glass", "ceramic", "leather")
_COLOURS = ("black", "white", "navy blue", "forest green", "grey", "red", "sand", "yellow", "orange")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_CITIES = ("Lisbon", "Oslo", "Leeds", "Lyon", "Porto", "Krakow", "Dublin", "Graz", "Utrecht", "Malmo")
_NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven", "ten", "fourteen", "thirty")
# department -> (what it handles, problems as a narrator reports them; "{p}" is a product)
_DEPARTMENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "billing": ("payments, refunds, invoices and receipts", (
        "her card had been charged twice for the {p}", "the refund for the {p} was still missing",
        "the invoice showed the wrong amount", "he had been overcharged", "the discount code did not work",
        "she needed a receipt for the {p}", "a payment had gone through two times",
    )),
    "shipping": ("deliveries, couriers, parcels and tracking numbers", (
        "the {p} had not arrived", "the parcel was a week late", "the tracking number did not work",
        "the courier had left the package with a neighbour", "the delivery was marked as delivered too early",
    )),
    "returns": ("returns, exchanges and items in the wrong size or colour", (
        "the {p} was the wrong size", "she wanted to return the {p}", "he wanted to exchange the {p}",
        "the {p} was too small", "the {p} came in the wrong colour", "the {p} did not fit",
    )),
    "technical": ("the app, the website, passwords and login problems", (
        "the app crashed at checkout", "he could not log in", "she had forgotten her password",
        "the password reset link did not work", "the website showed an error", "the app kept freezing",
    )),
    "account": ("email addresses, usernames, phone numbers and closing accounts", (
        "she wanted to change the email address on her account", "he asked us to delete his account",
        "she needed to update her phone number", "he wanted a new username",
        "she wanted to unsubscribe from the newsletter", "he wanted to merge two accounts",
    )),
}
_OPINIONS = (
    "It works exactly as described.", "The quality is better than I expected.", "It was well packed.",
    "The colour is a little darker than in the photos.", "I use it every day.", "It was a bit expensive.",
    "My family loves it.", "The instructions could be clearer.", "It feels cheap.", "I would buy it again.",
    "It broke after a month, sadly.", "Good value for the price.", "It is smaller than I thought.",
)
_SHOP_LINES = (
    "Our shop was founded in {city} by two friends who liked simple, useful things.",
    "Every parcel is packed by hand in our warehouse in {city}.",
    "We try to answer every message on the same working day.",
    "Customers can pay by card, bank transfer or gift card.",
    "Gift cards never expire and can be used for any product.",
    "Most items can be returned within thirty days if they are unused.",
    "We use recycled paper and card for all our packaging.",
    "Orders placed before noon usually leave the warehouse the same day.",
    "Sale items can be exchanged, but the discount is not refunded twice.",
    "Our newsletter comes out once a month with new products and small discounts.",
    "The app shows every order, its status and its tracking number.",
    "A strong password keeps your account and your saved cards safe.",
    "If something is wrong with an order, the order number helps us find it quickly.",
    "We are sorry when a parcel is late, and we always try to find out why.",
    "This season we added {count} new products, from the {p} to the {p2}.",
    "The {p} was our best seller in {city} last month.",
    "Many customers buy the {p} as a gift for a friend or a sister.",
    "Thank you to everyone who wrote to us with ideas this year.",
    "Our support team works from {start} in the morning until {end} in the evening.",
    "Good morning to all our readers, and thank you for shopping with us for so many years.",
)
_CARE_LINES = (
    "Wash the {p} in cold water and let it dry flat.", "Keep the {p} away from direct sunlight.",
    "Wipe the {p} with a soft, dry cloth.", "Do not put the {p} in the dishwasher.",
    "Store the {p} in a cool, dry place.", "Check the {p} for small cracks before use.",
    "The {p} should be cleaned once a week.", "If the {p} gets wet, dry it at room temperature.",
)
# Customer e-mails and the shop's replies, as found in any support inbox (plain prose, no chat format).
_HELLOS = ("Hi,", "Hello,", "Hello there,", "Good morning,", "Good evening,", "Dear shop,", "Hey,", "Hi team,")
_BYES = ("Thanks, {name}", "Best, {name}", "Regards, {name}", "Kind regards, {name}", "- {name}", "Cheers, {name}")
_ASKS = (
    "Can you help?", "Please help.", "Thanks in advance.", "What should I do?", "Could you look into it?",
    "I would appreciate a quick answer.", "I'd be grateful for a reply.", "Is there anything you can do?",
)
_MOODS = (
    "I ordered it last week.", "It was a gift for my brother.", "I have been a customer for years.",
    "I bought it on sale.", "This has never happened before.", "I am quite upset.", "I'm a bit worried.",
    "I don't want to wait much longer.", "My friend had the same problem last month.",
)
_FIRST_PERSON_PROBLEMS = (
    "I think I was charged twice (once on {day} and again on {day2})", "I'm still waiting for a refund",
    "the amount on my invoice is wrong", "I can't find the receipt in my e-mails", "my payment failed twice",
    "the discount code wasn't applied", "my parcel hasn't arrived yet", "the tracking page says it was delivered",
    "the courier never came", "the delivery is a week late", "I'd like to return the {p}",
    "can I exchange the {p} for a bigger size?", "the {p} is too big for me", "the {p} came in the wrong colour",
    "I want to send it back", "the app crashes every time I open it", "I can't log in since {day}",
    "I forgot my password and the reset link doesn't work", "the checkout page won't load",
    "the website shows an error", "I never received the login code", "I'd like to change my e-mail address",
    "please delete my old account", "I need to update my phone number", "how can I change my username?",
    "I want to unsubscribe from your newsletter", "can you close my account?",
    "this is the first time I have a problem with you", "my profile still shows my old name",
    "I got the {p} even though I cancelled it", "the item I got does not look like the photo",
    "could I get a copy of my invoice?", "I was billed even though the order was cancelled",
    "the payment went through but the status hasn't changed", "how do I see my old orders?",
    "please update the name on my profile", "it does not work at all", "my {p} broke after two days",
)
_REPLIES = (
    "Thank you for your message, {name}. I'm sorry to hear about the {p}; that shouldn't happen.",
    "Hi {name}, thanks for writing to us, and I'm sorry for the trouble.",
    "Dear {name}, we're sorry that your order caused so much trouble.",
    "Hello {name}, I'm sorry about the delay; I have checked the order myself.",
    "I'm sorry to hear about the {p}, {name}.", "I'm sorry for the wait, {name}, and thank you for your patience.",
)
_REPLY_STEPS = (
    "Your question was forwarded to {agent}, who will reply within {hours} hours.",
    "I have sent the details to {agent}; you will get a reply within {hours} hours.",
    "A colleague will look into it and reply within {hours} hours.",
    "We will send you a free return label, so you can send the {p} back at no cost.",
    "We usually fix problems like this within a day, and we will reply as soon as it is done.",
    "We can change or close your account details once you confirm your e-mail address.",
    "We will track the parcel with the courier and write again tomorrow.",
)
# One line per team, in the words the shop uses on its "who we are" page.
_TEAM_LINES = {
    "billing": "They handle charges, refunds and invoices, and they check every payment twice.",
    "shipping": "They track parcels and deliveries and talk to the couriers every day.",
    "returns": "They send a free return label for every return and swap items for the right size.",
    "technical": "They fix problems with the app and the website and keep your password safe.",
    "account": "They can change or close account details, from e-mail addresses to usernames.",
}
# fmt: on


def _order(rng: random.Random) -> str:
    return str(rng.randrange(10000, 100000))


def _fill(rng: random.Random, line: str) -> str:
    return line.format(
        p=rng.choice(_PRODUCTS), p2=rng.choice(_PRODUCTS), city=rng.choice(_CITIES),
        count=rng.randrange(3, 60), start=rng.randrange(7, 10), end=rng.randrange(5, 9),
    )  # fmt: skip


def _product_note(rng: random.Random) -> str:
    p, adj, mat = rng.choice(_PRODUCTS), rng.choice(_ADJECTIVES), rng.choice(_MATERIALS)
    return (
        f"The {adj} {p} is made of {mat} and comes in {rng.choice(_COLOURS)}. It weighs "
        f"{rng.randrange(90, 2000)} grams and costs {rng.randrange(5, 180)} dollars. {rng.choice(_OPINIONS)} "
        f"Item number {rng.randrange(1000, 10000)} is in stock in our warehouse in {rng.choice(_CITIES)}."
    )


def _order_email(rng: random.Random) -> str:
    name, p, n = rng.choice(_NAMES), rng.choice(_PRODUCTS), _order(rng)
    return (
        f"Dear {name}, thank you for shopping with us. We have received your order #{n} for a {p}. "
        f"Order #{n} will leave our warehouse on {rng.choice(_DAYS)}, and the courier usually needs "
        f"{rng.choice(_NUMBER_WORDS)} working days. Please keep the number #{n} for any question about it. "
        "Kind regards, the shop."
    )


def _shipping_notice(rng: random.Random) -> str:
    n, t = _order(rng), str(rng.randrange(100000, 1000000))
    return (
        f"Parcel update for order #{n}: the package left the warehouse on {rng.choice(_DAYS)}. "
        f"Its tracking number is {t}. If order #{n} is late, the tracking page for {t} shows where it is."
    )


def _faq(rng: random.Random) -> str:
    dept = rng.choice(list(_DEPARTMENTS))
    handles, problems = _DEPARTMENTS[dept]
    example = rng.choice(problems).format(p=rng.choice(_PRODUCTS))
    return (
        f"Who helps with {handles}? Questions about {handles} are handled by the {dept} team. "
        f"For example, one customer told us that {example}, and the {dept} team sorted it out. "
        f"{_fill(rng, rng.choice(_SHOP_LINES))}"
    )


def _support_story(rng: random.Random) -> str:
    name, agent, n = rng.choice(_NAMES), rng.choice(_NAMES), _order(rng)
    dept = rng.choice(list(_DEPARTMENTS))
    problem = rng.choice(_DEPARTMENTS[dept][1]).format(p=rng.choice(_PRODUCTS))
    hours = rng.choice(("two", "six", "twelve", "24", "48"))
    return (
        f"Last {rng.choice(_DAYS)} {name} wrote to the shop about order #{n} and said that {problem}. "
        f"{agent} from the {dept} team asked for the order number again, and {name} wrote #{n}. "
        f"{agent} looked at order #{n} within {hours} hours and wrote back. "
        f"In the end {name} was happy, and the {dept} team closed the case."
    )


def _review(rng: random.Random) -> str:
    p, name = rng.choice(_PRODUCTS), rng.choice(_NAMES)
    stars = rng.choice(("one", "two", "three", "four", "five"))
    return (
        f"Review by {name} from {rng.choice(_CITIES)}: "
        f"I bought the {p} {rng.choice(_NUMBER_WORDS)} weeks ago. "
        f"{rng.choice(_OPINIONS)} {rng.choice(_OPINIONS)} I give it {stars} stars."
    )


def _blog(rng: random.Random) -> str:
    lines = rng.sample(_SHOP_LINES, rng.randrange(3, 6)) + rng.sample(_CARE_LINES, rng.randrange(0, 3))
    return " ".join(_fill(rng, line) for line in lines)


def _customer_email(rng: random.Random) -> str:
    """An e-mail to the shop; parts on new lines or not, so words at line starts get trained too."""
    name, n = rng.choice(_NAMES), _order(rng)
    problem = rng.choice(_FIRST_PERSON_PROBLEMS).format(
        p=rng.choice(_PRODUCTS), day=rng.choice(_DAYS), day2=rng.choice(_DAYS)
    )
    problem = problem[:1].upper() + problem[1:]
    form = rng.randrange(4)
    if form == 0:
        problem = problem.rstrip("?") + f" (order #{n})."
    elif not problem.endswith("?"):
        problem += "."
    ref = ("", f"About order #{n}:", f"My order number is #{n}.", f"It's about order #{n}.")[form]
    parts = [rng.choice(_HELLOS), ref, problem] if form == 1 else [rng.choice(_HELLOS), problem, ref]
    parts += [rng.choice(_MOODS), rng.choice(_ASKS), rng.choice(_BYES).format(name=name)]
    sep = rng.choice((" ", "\n"))
    return sep.join(p for p in parts if p)


def _shop_reply(rng: random.Random) -> str:
    name, agent, p = rng.choice(_NAMES), rng.choice(_NAMES), rng.choice(_PRODUCTS)
    hours = rng.choice(("two", "six", "twelve", "24", "48"))
    return rng.choice((" ", "\n")).join(
        (
            rng.choice(_REPLIES).format(name=name, p=p),
            rng.choice(_REPLY_STEPS).format(agent=agent, hours=hours, p=p),
            rng.choice(("Best wishes, the shop.", f"Regards, {agent}", f"Thanks again; {agent} from the shop")),
        )
    )


def _team_page(rng: random.Random) -> str:
    depts = rng.sample(list(_TEAM_LINES), rng.randrange(2, 5))
    lines = [f"Meet our {d} team in {rng.choice(_CITIES)}. {_TEAM_LINES[d]}" for d in depts]
    return " ".join(lines) + " Each team will reply to your message within 24 hours on working days."


_DOC_KINDS = (
    _product_note, _order_email, _shipping_notice, _faq, _support_story, _review, _blog,
    _customer_email, _customer_email, _shop_reply, _team_page,
)  # fmt: skip


def generate_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """``n_docs`` plain-prose documents about the shop; deterministic in ``seed``."""
    rng = random.Random(seed)
    docs = [rng.choice(_DOC_KINDS)(rng) for _ in range(n_docs)]
    for d in docs:  # the base model must not have seen the chat format
        assert "<|" not in d and "to our" not in d, d
    return docs


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


def _make_model(
    tokenizer: Any, hidden: int, layers: int, heads: int, max_positions: int, init_std: float = 0.02
) -> Any:
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

Built by project code (`aigc.models.tiny`, seed {seed}); rebuild with

    python -m aigc.models.tiny assets/tiny-base
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
    model = _make_model(tokenizer, hidden, layers, heads, max_positions)
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
    """CLI: ``python -m aigc.models.tiny OUT_DIR [--seed S] [--steps N]``."""
    ap = argparse.ArgumentParser(description="Pretrain the tiny offline base model into OUT_DIR.")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=800)
    args = ap.parse_args(argv)
    print(build_tiny_base(args.out_dir, seed=args.seed, steps=args.steps))


if __name__ == "__main__":
    main()

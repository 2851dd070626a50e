"""The demo dataset: customer-support messages for a fictional shop, with answers that can be scored.

A customer writes about a problem with an order (``#48213``). The words describing the problem decide which
department handles it (billing, shipping, returns, technical, account), and the correct reply routes the
message to that department, in that department's words::

    I'm sorry about that. I have forwarded your message to our billing team; they handle charges, refunds
    and invoices and will reply within 24 hours.

(The reply does not repeat the order number: copying five arbitrary digits is beyond a ~1M-parameter model
trained for minutes on two CPU cores, and a demo model that invents order numbers would teach the wrong lesson.)

Because the answer follows from the question alone, :func:`score_answer` can grade any model's reply, and
:func:`expected_answer_fields` recovers the ground truth from the question text (rows carry no extra fields).
Everything here is pure Python seeded by ``random.Random``: the same seed gives the same bytes.

Held-out questions (:func:`demo_eval_prompts`) use order numbers that are multiples of
:data:`HELDOUT_ORDER_MODULUS`, which training rows never use, so no evaluation question equals a training one.

Rebuild the committed file with ``python -m aigc.demo.dataset assets/demo-data/support.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

__all__ = [
    "DEPARTMENTS",
    "HELDOUT_ORDER_MODULUS",
    "answer_for",
    "demo_eval_prompts",
    "expected_answer_fields",
    "generate_support_examples",
    "score_answer",
    "write_demo_dataset",
]

DEPARTMENTS: tuple[str, ...] = ("billing", "shipping", "returns", "technical", "account")
HELDOUT_ORDER_MODULUS = 7
DEFAULT_N = 2000
DEFAULT_N_BAD = 8

# fmt: off
# Problem phrases per department; "{p}" is a product. Each contains a keyword of its own department only.
_PROBLEMS: dict[str, tuple[str, ...]] = {
    "billing": (
        "I was charged twice for the {p}",
        "my card was charged twice",
        "I am still waiting for my refund for the {p}",
        "I need an invoice for the {p}",
        "the invoice shows the wrong amount",
        "I was overcharged for the {p}",
        "my payment went through two times",
        "the discount code was not applied to my payment",
        "could I get a copy of the receipt for the {p}",
        "I was billed for the {p} even though I cancelled it",
    ),
    "shipping": (
        "the {p} has not arrived yet",
        "my parcel is two weeks late",
        "the tracking number does not work",
        "the tracking page has not changed in days",
        "the delivery of the {p} is late",
        "the courier left my parcel with the wrong neighbour",
        "my package still has not arrived",
        "it says delivered but I never got the {p}",
    ),
    "returns": (
        "I would like to return the {p}",
        "can I exchange the {p} for a bigger size",
        "the {p} is the wrong size",
        "I received the {p} in the wrong colour",
        "I want to send the {p} back",
        "the {p} is too small",
        "how do I return an item I do not need",
        "the {p} does not fit",
    ),
    "technical": (
        "the app crashes when I open my orders",
        "I can't log in",
        "I forgot my password",
        "the password reset link does not work",
        "the website shows an error when I pay for the {p}",
        "the app keeps freezing",
        "the checkout page will not load",
        "I never get the login code",
    ),
    "account": (
        "I want to change the email address on my account",
        "please delete my account",
        "I need to update my phone number",
        "how do I change my username",
        "I want to unsubscribe from the newsletter",
        "please close my account",
        "I would like to merge my two accounts",
        "I want to update the name on my profile",
    ),
}

# Keywords that identify a department in free text (whole words, case-insensitive).
_KEYWORDS: dict[str, tuple[str, ...]] = {
    "billing": (
        r"charged twice", r"double[- ]charged", r"refunds?", r"invoices?", r"receipts?", r"overcharged",
        r"billed", r"payments?", r"discount code",
    ),
    "shipping": (
        r"late", r"arrived", r"tracking", r"delivery", r"delivered", r"courier", r"parcels?", r"packages?",
    ),
    "returns": (
        r"return(?:ed|ing)?", r"exchange", r"wrong size", r"wrong colou?r", r"send\b.{0,40}?\bback",
        r"too (?:small|big|large|tight|loose)", r"does(?:n't| not) fit",
    ),
    "technical": (
        r"app", r"crash(?:es|ed)?", r"log ?in", r"password", r"website", r"error", r"freezing",
        r"checkout page", r"load",
    ),
    "account": (
        r"email address", r"accounts?", r"phone number", r"username", r"newsletter", r"unsubscribe",
        r"profile",
    ),
}
_KEYWORD_RES = {d: re.compile(r"\b(?:" + "|".join(ks) + r")\b", re.IGNORECASE) for d, ks in _KEYWORDS.items()}
_ORDER_RE = re.compile(r"#(\d{4,8})\b")
_DEPARTMENT_RE = re.compile(r"\b(" + "|".join(DEPARTMENTS) + r")\b", re.IGNORECASE)

_PRODUCTS = (
    "pair of running shoes", "coffee grinder", "wool sweater", "desk lamp", "yoga mat", "phone case",
    "water bottle", "rain jacket", "gift card", "bluetooth speaker", "kettle", "cotton shirt",
    "pair of hiking boots", "blender", "notebook set", "pair of sunglasses", "pair of winter gloves",
    "teapot", "board game", "travel mug", "garden chair", "wall clock", "bath towel", "leather belt",
)
_NAMES = (
    "Maria", "Tom", "Aisha", "Lukas", "Chen", "Priya", "Oliver", "Sofia", "James", "Fatima", "Noah", "Elena",
    "Ravi", "Hannah", "Mateo", "Yuki", "Grace", "Omar", "Ingrid", "Daniel",
)
_GREETINGS = ("Hi,", "Hello,", "Hello there,", "Good morning,", "Dear support team,", "Hey,", "Hi team,", "")
_CONTEXT = (
    "I ordered it last week.", "It was a gift for my sister.", "I have been a customer for years.",
    "I bought it on sale.", "This is the first time this has happened.", "I am quite upset.", "", "", "",
)
_CLOSINGS = (
    "Can you help?", "Please help.", "Thanks in advance.", "What should I do?", "Could you look into it?",
    "I would appreciate a quick answer.", "", "",
)
_SIGNOFFS = ("- {name}", "Thanks, {name}", "Best, {name}", "Regards, {name}", "", "")
# How the order number is attached to the problem ("{q}" = problem phrase, "{n}" = order number).
_ORDER_FORMS = (
    "{Q} (order #{n}).",
    "Order #{n}: {q}.",
    "{Q}. My order number is #{n}.",
    "About order #{n}: {q}.",
    "{Q}, order #{n}.",
    "I am writing about order #{n}. {Q}.",
    "{Q}. The order is #{n}.",
)
# fmt: on

_NEXT_STEP = {
    "billing": "they handle charges, refunds and invoices",
    "shipping": "they track parcels and deliveries",
    "returns": "they will send you a free return label",
    "technical": "they fix problems with the app and the website",
    "account": "they can change or close your account details",
}
_ANSWER = "I'm sorry about that. I have forwarded your message to our {d} team; {step} and will reply within 24 hours."


def answer_for(department: str) -> str:
    """The correct reply for a department."""
    if department not in DEPARTMENTS:
        raise ValueError(f"unknown department {department!r}; expected one of {DEPARTMENTS}")
    return _ANSWER.format(d=department, step=_NEXT_STEP[department])


def expected_answer_fields(question: str) -> dict[str, str | None]:
    """Ground truth recovered from a customer message: ``{"department": ..., "order": ...}``.

    The department is the one whose keyword appears first in the text; the order is the first ``#<digits>``.
    Either is ``None`` when the message has none.
    """
    first: tuple[int, str] | None = None
    for dept, rx in _KEYWORD_RES.items():
        m = rx.search(question)
        if m and (first is None or m.start() < first[0]):
            first = (m.start(), dept)
    order = _ORDER_RE.search(question)
    return {"department": first[1] if first else None, "order": order.group(1) if order else None}


def score_answer(question: str, answer: str) -> bool:
    """True iff ``answer`` routes to exactly the right department and mentions no other order number."""
    truth = expected_answer_fields(question)
    if truth["department"] is None:
        return False
    departments = {m.lower() for m in _DEPARTMENT_RE.findall(answer)}
    orders = set(_ORDER_RE.findall(answer))
    return departments == {truth["department"]} and orders <= {truth["order"]}


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _order_number(rng: random.Random, heldout: bool) -> str:
    """A 5-digit order number; held-out ones are multiples of HELDOUT_ORDER_MODULUS, training ones never."""
    while True:
        n = rng.randrange(10000, 100000)
        if (n % HELDOUT_ORDER_MODULUS == 0) == heldout:
            return str(n)


def _message(rng: random.Random, dept: str, order: str) -> str:
    """One customer message about ``order`` whose problem belongs to ``dept``."""
    problem = rng.choice(_PROBLEMS[dept]).format(p=rng.choice(_PRODUCTS))
    core = rng.choice(_ORDER_FORMS).format(q=problem, Q=_capitalize(problem), n=order)
    parts = [rng.choice(_GREETINGS), rng.choice(_CONTEXT), core, rng.choice(_CLOSINGS)]
    if rng.random() < 0.5:  # context before or after the problem
        parts[1], parts[2] = parts[2], parts[1]
    parts.append(rng.choice(_SIGNOFFS).format(name=rng.choice(_NAMES)))
    return " ".join(p for p in parts if p)


def _generate(n: int, seed: int, heldout: bool) -> list[tuple[str, str, str]]:
    """``n`` distinct (message, department, order) triples, departments balanced, in shuffled order."""
    rng = random.Random(seed * 2 + int(heldout))
    seen: set[str] = set()
    out: list[tuple[str, str, str]] = []
    while len(out) < n:
        dept = DEPARTMENTS[len(out) % len(DEPARTMENTS)]
        order = _order_number(rng, heldout)
        msg = _message(rng, dept, order)
        if msg in seen:
            continue
        truth = expected_answer_fields(msg)
        if truth != {"department": dept, "order": order}:  # a template bug, not bad luck
            raise AssertionError(f"ambiguous demo message {msg!r}: parsed {truth}, meant {dept} #{order}")
        seen.add(msg)
        out.append((msg, dept, order))
    rng.shuffle(out)
    return out


def generate_support_examples(n: int, seed: int = 0, heldout: bool = False) -> list[dict[str, str]]:
    """``n`` distinct training rows ``{"instruction": message, "input": "", "output": reply}`` (alpaca); with
    ``heldout``, rows whose order numbers never occur in training rows (``aigc eval``'s held-out prompts)."""
    return [
        {"instruction": msg, "input": "", "output": answer_for(dept)}
        for msg, dept, _ in _generate(n, seed, heldout=heldout)
    ]


def demo_eval_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` held-out customer messages; their order numbers never occur in training rows."""
    return [msg for msg, _, _ in _generate(n, seed, heldout=True)]


def _bad_rows(n_bad: int, seed: int) -> list[str]:
    """JSONL lines a validator must quarantine: no output, empty output, non-string output, broken JSON."""
    good = generate_support_examples(n_bad, seed + 1)
    lines: list[str] = []
    for i, row in enumerate(good):
        kind = i % 4
        if kind == 0:
            lines.append(json.dumps({"instruction": row["instruction"], "input": ""}))
        elif kind == 1:
            lines.append(json.dumps({**row, "output": ""}))
        elif kind == 2:
            lines.append(json.dumps({**row, "output": 24}))
        else:
            lines.append(json.dumps(row)[: -len(row["output"]) // 2])  # truncated: not valid JSON
    return lines


def write_demo_dataset(
    path: str | Path, n: int = DEFAULT_N, seed: int = 0, n_bad: int = DEFAULT_N_BAD, heldout: bool = False
) -> dict[str, int]:
    """Write ``n`` good rows (held-out ones with ``heldout``) and ``n_bad`` malformed lines (spread through the
    file) as JSONL.

    Returns ``{"good": n, "bad": n_bad, "lines": n + n_bad}``. Same arguments -> same bytes.
    """
    lines = [json.dumps(row) for row in generate_support_examples(n, seed, heldout)]
    bad = _bad_rows(n_bad, seed)
    for k, line in enumerate(bad):  # evenly spaced, deterministic positions
        lines.insert((k + 1) * len(lines) // (len(bad) + 1), line)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"good": n, "bad": len(bad), "lines": len(lines)}


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m aigc.demo.dataset OUT.jsonl [--n N] [--seed S] [--n-bad B] [--held-out]``."""
    ap = argparse.ArgumentParser(description="Write the demo customer-support dataset (JSONL).")
    ap.add_argument("path", help="output .jsonl file")
    ap.add_argument("--n", type=int, default=DEFAULT_N, help="good rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-bad", type=int, default=DEFAULT_N_BAD, help="malformed lines to quarantine")
    ap.add_argument("--held-out", action="store_true", help="rows never trained on (order numbers apart)")
    args = ap.parse_args(argv)
    counts = write_demo_dataset(args.path, n=args.n, seed=args.seed, n_bad=args.n_bad, heldout=args.held_out)
    print(f"wrote {args.path}: {counts}")


if __name__ == "__main__":
    main()

"""The tiny base model's pretraining corpus: deterministic plain prose about a fictional online shop.

Product notes, order e-mails, FAQ paragraphs, support stories, customer e-mails and replies, team pages and
reviews. It contains no chat-template markers and never the demo's reply sentence, so the model pretrained on
it (:mod:`aigc.demo.tiny_base`) knows the shop's vocabulary but not the support task.
"""

from __future__ import annotations

import random

__all__ = ["generate_corpus"]

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

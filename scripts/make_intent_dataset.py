"""Generate peftkit's second bundled task: customer messages -> their intent, one word (exact-match scored).

Usage:  python scripts/make_intent_dataset.py [--seed 0] [--train 1500] [--eval 60] [--out peftkit/data]

Each row is alpaca-style: the instruction is always `Classify the customer message as billing, delivery, refund,
technical or account. Answer with one word.`, the input one message ("The courier left the blender at the wrong
address.") and the output its intent alone ("delivery"). Scored by exact match of the greedy answer.

It is a task of another kind than the extraction task (task_train.jsonl): the answer is never copied from the
input but chosen from five labels by what the message means, and the held-out messages are worded differently
from every training message, so a method must learn the intents, not the sentences. The held-out split is
disjoint by construction: its products and every one of its sentence templates never occur in training
(`check_disjoint`); only the five intents are shared, because they are the task.

Why not arithmetic: word problems were tried first, and SmolLM2-135M learned nothing measurable from 30 steps of
them (two-step problems 0-8% for every method; one-step problems with one-digit operands 6-8%), because the base
model cannot add or subtract reliably and 30 steps do not teach it. Deterministic for a given seed (Python's
`random.Random`).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from make_dataset import write_jsonl  # scripts/ is on sys.path when run as a script

INSTRUCTION = ("Classify the customer message as billing, delivery, refund, technical or account. "
               "Answer with one word.")
PRODUCTS_TRAIN = ["blender", "laptop", "jacket", "coffee machine", "phone case", "desk lamp", "backpack", "headphones",
                  "kettle", "printer", "sofa", "camera", "watch", "vacuum cleaner", "keyboard", "mattress"]
PRODUCTS_EVAL = ["toaster", "tablet", "rain boots", "router", "bookshelf", "electric drill"]

# {p}: a product. Per intent: the training templates, then the held-out templates (worded differently throughout).
TEMPLATES: dict[str, tuple[list[str], list[str]]] = {
    "billing": ([
        "I was charged twice for my {p} order.",
        "Why is there an extra fee on my invoice for the {p}?",
        "My card was billed the wrong amount for the {p}.",
        "The price on my receipt for the {p} is higher than the one on your website.",
        "Can you send me a corrected invoice for the {p}?",
        "You took the payment for the {p} two times this month.",
    ], [
        "The statement shows {p} costs that I never agreed to pay.",
        "Somebody at your company added a surcharge to what I owe for the {p}.",
        "Please explain the amount deducted from my bank account for the {p}.",
    ]),
    "delivery": ([
        "My {p} has not arrived yet.",
        "The courier left the {p} at the wrong address.",
        "When will my {p} be shipped?",
        "The tracking number for my {p} does not work.",
        "The parcel with my {p} is stuck at the depot.",
        "My {p} was sent to my old address.",
    ], [
        "It has been two weeks and the {p} is still nowhere to be seen.",
        "Nobody rang the bell, but the app says the {p} was handed over.",
        "Could the {p} come on Saturday instead, when I am at home?",
    ]),
    "refund": ([
        "I want my money back for the {p}.",
        "I returned the {p} last week and still have no refund.",
        "Please refund the {p}, I no longer need it.",
        "How long does a refund for the {p} take?",
        "I cancelled the {p} order, when do I get my money?",
        "The {p} was faulty, so I would like a refund.",
    ], [
        "I sent the {p} back to you, so please return what I paid.",
        "Reimburse me for the {p}, it was not what I ordered.",
        "Your shop kept my payment although the {p} went back to you a month ago.",
    ]),
    "technical": ([
        "The {p} will not turn on.",
        "My {p} stopped working after a day.",
        "The {p} makes a strange noise when I use it.",
        "How do I reset the {p} to its factory settings?",
        "The {p} keeps switching itself off.",
        "The screen of the {p} stays black.",
    ], [
        "Since yesterday the {p} gives an error as soon as I start it.",
        "The {p} gets very hot and then freezes.",
        "Which setting makes the {p} run properly again after the update?",
    ]),
    "account": ([
        "I cannot log in to my account.",
        "How do I change the password of my account?",
        "Please delete my account and my data.",
        "I want to update the email address on my profile.",
        "My account was locked after I ordered the {p}.",
        "Someone else signed in to my account and ordered a {p}.",
    ], [
        "The sign-in page rejects my details although I typed them correctly, so I cannot see the {p} order.",
        "Please move my profile to a new email, I lost access to the one I used for the {p}.",
        "I have not used your website since the {p}, remove everything you store about me.",
    ]),
}


def make_split(rng: random.Random, n: int, held_out: bool) -> list[dict]:
    """n rows, the intents in turn (balanced), each a random template of the split with a random product; a
    message is drawn again while its intent can still make one the split does not have."""
    products = PRODUCTS_EVAL if held_out else PRODUCTS_TRAIN
    intents = list(TEMPLATES)
    rows: list[dict] = []
    seen: dict[str, set[str]] = {intent: set() for intent in intents}
    while len(rows) < n:
        intent = intents[len(rows) % len(intents)]
        text = rng.choice(TEMPLATES[intent][held_out]).format(p=rng.choice(products))
        if text not in seen[intent] or len(seen[intent]) >= distinct(intent, held_out):
            seen[intent].add(text)
            rows.append({"instruction": INSTRUCTION, "input": text, "output": intent})
    rng.shuffle(rows)
    return rows


def distinct(intent: str, held_out: bool) -> int:
    """How many distinct messages of `intent` the split's templates and products can make."""
    products = PRODUCTS_EVAL if held_out else PRODUCTS_TRAIN
    return sum(len(products) if "{p}" in t else 1 for t in TEMPLATES[intent][held_out])


def check_disjoint() -> None:
    """The held-out pools share no product and no template with training."""
    train = [t for pair in TEMPLATES.values() for t in pair[0]]
    held = [t for pair in TEMPLATES.values() for t in pair[1]]
    for a, b in [(PRODUCTS_TRAIN, PRODUCTS_EVAL), (train, held)]:
        overlap = set(a) & set(b)
        assert not overlap, f"train and eval pools overlap: {overlap}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=1500, help="number of training rows")
    ap.add_argument("--eval", type=int, default=60, help="number of held-out rows")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "peftkit" / "data")
    args = ap.parse_args()

    check_disjoint()
    rng = random.Random(args.seed)
    train = make_split(rng, args.train, held_out=False)
    held_out = make_split(rng, args.eval, held_out=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "intent_train.jsonl", train)
    write_jsonl(args.out / "intent_eval.jsonl", held_out)
    print(f"wrote {len(train)} train and {len(held_out)} eval rows to {args.out}")


if __name__ == "__main__":
    main()

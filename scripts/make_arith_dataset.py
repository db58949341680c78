"""Generate peftkit's second bundled task: short arithmetic word problems with a verifiable numeric answer.

Usage:  python scripts/make_arith_dataset.py [--seed 0] [--train 1500] [--eval 100] [--out peftkit/data]

Each row is alpaca-style: the instruction is always `Solve the word problem. Answer with the number only.`, the
input is a one- or two-step problem in words ("Hugo has 14 marbles. He buys 9 more. How many marbles does he
have now?") and the output is the number alone ("23"). Scored by exact match of the greedy answer.

It is a task of another kind than the extraction task (task_train.jsonl): the answer is not copied from the input
but computed (addition, subtraction, multiplication, and one two-step shape), so method comparisons that agree on
both tasks do not rest on one kind of skill. The held-out split is disjoint by construction: its names, objects and
every one of its sentence templates never occur in training (`check_disjoint`); only the operations are shared,
because they are the task. Deterministic for a given seed (Python's `random.Random`).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from pathlib import Path

from make_dataset import write_jsonl  # scripts/ is on sys.path when run as a script

INSTRUCTION = "Solve the word problem. Answer with the number only."

NAMES_TRAIN = ["Maria", "James", "Aisha", "Kenji", "Olivia", "Lucas", "Fatima", "Daniel", "Sofia", "Mateo", "Chloe",
               "Ethan", "Priya", "Noah", "Elena", "Omar", "Hannah", "Diego", "Grace", "Samuel", "Leila", "Victor"]
NAMES_EVAL = ["Beatrice", "Tariq", "Hilde", "Joaquin", "Margot", "Ibrahim", "Selma", "Wendell"]
OBJECTS_TRAIN = ["apples", "marbles", "stamps", "pencils", "coins", "stickers", "books", "shells", "cards", "eggs"]
OBJECTS_EVAL = ["lemons", "buttons", "candles", "ribbons", "tickets"]

# {n} name, {o} object (plural), {a} {b} {c} numbers. Each entry: (template, answer from (a, b, c), ranges of a, b, c).
Problem = tuple[str, Callable[[int, int, int], int], tuple[range, range, range]]
SMALL, MID, FACTOR = range(2, 30), range(2, 20), range(2, 10)
TEMPLATES_TRAIN: list[Problem] = [
    ("{n} has {a} {o}. {n} buys {b} more. How many {o} does {n} have now?", lambda a, b, c: a + b, (SMALL, SMALL, SMALL)),
    ("There are {a} {o} in a box and {b} {o} on the table. How many {o} are there in all?", lambda a, b, c: a + b, (SMALL, SMALL, SMALL)),
    ("{n} had {a} {o} and gave {b} of them away. How many {o} are left?", lambda a, b, c: a - b, (range(20, 60), MID, SMALL)),
    ("A shelf holds {a} {o}. {b} are taken off. How many {o} stay on the shelf?", lambda a, b, c: a - b, (range(20, 60), MID, SMALL)),
    ("{n} packs {a} bags with {b} {o} in each bag. How many {o} is that?", lambda a, b, c: a * b, (FACTOR, FACTOR, SMALL)),
    ("Each of {a} friends brings {b} {o}. How many {o} do they bring together?", lambda a, b, c: a * b, (FACTOR, FACTOR, SMALL)),
    ("{n} has {a} {o}, finds {b} more, then loses {c}. How many {o} does {n} have?", lambda a, b, c: a + b - c, (SMALL, SMALL, range(1, 20))),
    ("A jar has {a} {o}. {n} adds {b} and later removes {c}. How many {o} are in the jar?", lambda a, b, c: a + b - c, (SMALL, SMALL, range(1, 20))),
]
TEMPLATES_EVAL: list[Problem] = [
    ("{n} collects {a} {o} on Monday and {b} {o} on Tuesday. How many {o} did {n} collect?", lambda a, b, c: a + b, (SMALL, SMALL, SMALL)),
    ("{n} starts with {a} {o} and sells {b}. How many {o} remain?", lambda a, b, c: a - b, (range(20, 60), MID, SMALL)),
    ("There are {a} rows of {o} with {b} {o} in every row. How many {o} are there?", lambda a, b, c: a * b, (FACTOR, FACTOR, SMALL)),
    ("{n} owns {a} {o}, is given {b}, and gives {c} to a neighbour. How many {o} does {n} own now?", lambda a, b, c: a + b - c, (SMALL, SMALL, range(1, 20))),
]


def make_row(rng: random.Random, names: list[str], objects: list[str], templates: list[Problem]) -> dict:
    template, answer, (ra, rb, rc) = rng.choice(templates)
    a, b, c = rng.choice(ra), rng.choice(rb), rng.choice(rc)
    while answer(a, b, c) < 0:  # "loses more than it has": draw the numbers again
        a, b, c = rng.choice(ra), rng.choice(rb), rng.choice(rc)
    text = template.format(n=rng.choice(names), o=rng.choice(objects), a=a, b=b, c=c)
    return {"instruction": INSTRUCTION, "input": text, "output": str(answer(a, b, c))}


def make_split(rng: random.Random, n: int, names: list[str], objects: list[str], templates: list[Problem]) -> list[dict]:
    """n distinct problems (a repeated problem text is drawn again)."""
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < n:
        row = make_row(rng, names, objects, templates)
        if row["input"] not in seen:
            seen.add(row["input"])
            rows.append(row)
    return rows


def check_disjoint() -> None:
    """The held-out pools share no name, object or template with training."""
    for train, held_out in [(NAMES_TRAIN, NAMES_EVAL), (OBJECTS_TRAIN, OBJECTS_EVAL),
                            ([t for t, _, _ in TEMPLATES_TRAIN], [t for t, _, _ in TEMPLATES_EVAL])]:
        overlap = set(train) & set(held_out)
        assert not overlap, f"train and eval pools overlap: {overlap}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=1500, help="number of training rows")
    ap.add_argument("--eval", type=int, default=100, help="number of held-out rows")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "peftkit" / "data")
    args = ap.parse_args()

    check_disjoint()
    rng = random.Random(args.seed)
    train = make_split(rng, args.train, NAMES_TRAIN, OBJECTS_TRAIN, TEMPLATES_TRAIN)
    held_out = make_split(rng, args.eval, NAMES_EVAL, OBJECTS_EVAL, TEMPLATES_EVAL)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "arith_train.jsonl", train)
    write_jsonl(args.out / "arith_eval.jsonl", held_out)
    print(f"wrote {len(train)} train and {len(held_out)} eval rows to {args.out}")


if __name__ == "__main__":
    main()

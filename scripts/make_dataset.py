"""Generate peftkit's bundled default dataset: sentence -> one-line JSON record (exact-match scored).

Usage:  python scripts/make_dataset.py [--seed 0] [--train 1500] [--eval 50] [--out peftkit/data]

The task (documented in peftkit/data/README.md): read one English sentence that mentions a person, a city and a
date, and answer with exactly one compact JSON line, keys in a fixed order and the date normalised to ISO 8601:

    {"name": "Maria Lopez", "city": "Lisbon", "date": "2021-03-05"}

The base SmolLM2-135M-Instruct fails it (it chats, wraps the answer in code fences, reorders or renames keys, and
does not normalise dates), while a few minutes of LoRA learn it. The eval split is a real generalisation test:
its first names, last names, cities and sentence templates never occur in the training split (asserted below).
The output is deterministic for a given seed (Python's `random.Random`, whose choice/shuffle are stable).
"""

from __future__ import annotations

import argparse
import calendar
import json
import random
from pathlib import Path

INSTRUCTION = "Extract name, city and date as name=...; city=...; date=YYYY-MM-DD"

# Disjoint pools: the eval split draws only from the *_EVAL lists.
FIRST_TRAIN = ["Maria", "James", "Aisha", "Kenji", "Olivia", "Lucas", "Fatima", "Daniel", "Sofia", "Mateo", "Chloe", "Ethan", "Priya", "Noah", "Elena", "Omar", "Hannah", "Diego", "Grace", "Samuel", "Leila", "Victor", "Nora", "Arjun", "Clara", "Felix", "Ingrid", "Tomas", "Yara", "Hugo", "Amara", "Pablo", "Lena", "Ravi", "Zoe", "Marco", "Ada", "Ivan", "Mina", "Oscar", "Julia", "Kofi", "Alice", "Rafael", "Sara", "Leo", "Nadia", "Theo", "Irene", "Caleb", "Mei", "Simon", "Rosa", "Adrian", "Lucia", "Jonas", "Emma", "Hassan", "Paula", "Dmitri"]
FIRST_EVAL = ["Beatrice", "Tariq", "Hilde", "Joaquin", "Margot", "Ibrahim", "Selma", "Wendell", "Ottilie", "Rashid", "Colette", "Anders", "Imogen", "Bruno", "Esther"]
LAST_TRAIN = ["Lopez", "Smith", "Khan", "Tanaka", "Brown", "Silva", "Haddad", "Miller", "Rossi", "Garcia", "Martin", "Novak", "Patel", "Walker", "Costa", "Ahmed", "Fischer", "Moreno", "Clarke", "Nakamura", "Dubois", "Kowalski", "Jensen", "Ortiz", "Bauer", "Mensah", "Romano", "Schmidt", "Reyes", "Lindqvist", "Okafor", "Hughes", "Petrov", "Duarte", "Sato", "Murphy", "Weber", "Nguyen", "Castillo", "Andersen", "Ferreira", "Cohen", "Yilmaz", "Baker", "Morales", "Varga", "Horvat", "Lund", "Quinn", "Sharma", "Turner", "Keller", "Alvarez", "Becker", "Moretti", "Wright", "Santos", "Ivanova"]
LAST_EVAL = ["Abernathy", "Thorsen", "Valdez", "Okonkwo", "Lindgren", "Marchetti", "Brennan", "Haugen", "Delacroix", "Sorensen", "Kapoor", "Whitfield", "Navarro", "Engstrom", "Achterberg"]
CITY_TRAIN = ["Lisbon", "Toronto", "Nairobi", "Osaka", "Madrid", "Berlin", "Chicago", "Lagos", "Prague", "Seoul", "Dublin", "Lima", "Vienna", "Mumbai", "Denver", "Cairo", "Oslo", "Bogota", "Munich", "Sydney", "Boston", "Athens", "Warsaw", "Hanoi", "Dallas", "Porto", "Zurich", "Manila", "Montreal", "Krakow", "Seattle", "Accra", "Milan", "Helsinki", "Austin", "Quito", "Lyon", "Perth", "Atlanta", "Bangkok", "Geneva", "Santiago", "Glasgow", "Istanbul", "Phoenix", "Budapest", "Auckland", "Marseille", "Hamburg", "Calgary", "Naples", "Kyoto", "Tunis", "Valencia", "Detroit", "Riga", "Havana", "Leeds"]
CITY_EVAL = ["Copenhagen", "Edinburgh", "Melbourne", "Barcelona", "Vancouver", "Amsterdam", "Stockholm", "Florence", "Brisbane", "Montevideo", "Rotterdam", "Bordeaux", "Salzburg", "Nashville", "Casablanca"]

# Sentence templates; {n} name, {c} city, {d} date. The eval split uses different templates.
TEMPLATES_TRAIN = [
    "{n} moved to {c} on {d}.",
    "On {d}, {n} arrived in {c}.",
    "{c} welcomed {n} on {d}.",
    "{n} opened a small bakery in {c} on {d}.",
    "The conference in {c} on {d} was opened by {n}.",
    "{n} signed the lease for a flat in {c} on {d}.",
    "On {d} the mayor of {c} gave an award to {n}.",
    "{n} gave a talk about solar power in {c} on {d}, with about 40 people in the room.",
    "After three years abroad, {n} returned to {c} on {d}.",
    "Flight 217 brought {n} to {c} on {d}.",
    "{n} ran the {c} marathon on {d} and finished in under four hours.",
    "It was on {d} that {n} first visited {c}.",
    "{n} was born in {c} on {d}.",
    "The museum in {c} hired {n} on {d}.",
    "On {d}, police in {c} thanked {n} for finding a lost dog.",
    "{n} started a new job at a hospital in {c} on {d}.",
]
TEMPLATES_EVAL = [
    "{n} got married in {c} on {d}.",
    "On {d}, a crowd in {c} cheered for {n}.",
    "The library of {c} named {n} its director on {d}.",
    "{n} played piano at a concert in {c} on {d}, and tickets sold out in a day.",
    "Two friends met {n} at the train station in {c} on {d}.",
    "A street festival in {c} on {d} was organised by {n}.",
]


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


# Surface forms of one date; every split uses all of them (they are part of the task, not of the test).
DATE_FORMS = [
    lambda y, m, d: f"{calendar.month_name[m]} {d}, {y}",  # March 5, 2021
    lambda y, m, d: f"{d} {calendar.month_name[m]} {y}",  # 5 March 2021
    lambda y, m, d: f"the {_ordinal(d)} of {calendar.month_name[m]}, {y}",  # the 5th of March, 2021
    lambda y, m, d: f"{calendar.month_abbr[m]} {d}, {y}",  # Mar 5, 2021
    lambda y, m, d: f"{calendar.month_name[m]} {_ordinal(d)}, {y}",  # March 5th, 2021
]


def make_row(rng: random.Random, firsts, lasts, cities, templates) -> dict:
    name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
    city = rng.choice(cities)
    y, m = rng.randint(1990, 2030), rng.randint(1, 12)
    d = rng.randint(1, calendar.monthrange(y, m)[1])
    template = rng.choice(templates)
    date_text = rng.choice(DATE_FORMS)(y, m, d)
    sentence = template.format(n=name, c=city, d=date_text)
    sentence = sentence[0].upper() + sentence[1:]  # "the 5th of ..." at the start of a sentence
    answer = f"name={name}; city={city}; date={y:04d}-{m:02d}-{d:02d}"
    return {"instruction": INSTRUCTION, "input": sentence, "output": answer}


def make_split(rng: random.Random, n: int, firsts, lasts, cities, templates) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < n:
        row = make_row(rng, firsts, lasts, cities, templates)
        if row["input"] not in seen:
            seen.add(row["input"])
            rows.append(row)
    return rows


def check_disjoint() -> None:
    for train, held_out in [(FIRST_TRAIN, FIRST_EVAL), (LAST_TRAIN, LAST_EVAL), (CITY_TRAIN, CITY_EVAL),
                            (TEMPLATES_TRAIN, TEMPLATES_EVAL)]:
        overlap = set(train) & set(held_out)
        assert not overlap, f"train and eval pools overlap: {overlap}"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=1500, help="number of training rows")
    ap.add_argument("--eval", type=int, default=50, help="number of held-out rows")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "peftkit" / "data")
    args = ap.parse_args()

    check_disjoint()
    rng = random.Random(args.seed)
    train = make_split(rng, args.train, FIRST_TRAIN, LAST_TRAIN, CITY_TRAIN, TEMPLATES_TRAIN)
    held_out = make_split(rng, args.eval, FIRST_EVAL, LAST_EVAL, CITY_EVAL, TEMPLATES_EVAL)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "task_train.jsonl", train)
    write_jsonl(args.out / "task_eval.jsonl", held_out)
    print(f"wrote {len(train)} train and {len(held_out)} eval rows to {args.out}")


if __name__ == "__main__":
    main()

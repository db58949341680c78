"""Generate peftkit's bundled preference task from the bundled SFT task: chosen = its answer, rejected = a plausible
wrong one.

Usage:  python scripts/make_preference_dataset.py [--seed 0] [--train 500] [--out peftkit/data]

Reads peftkit/data/task_train.jsonl and task_eval.jsonl (written by scripts/make_dataset.py) and writes
preference_train.jsonl (the first --train rows) and preference_eval.jsonl (all 50 held-out rows) as TRL's text
preference format: {"prompt": <the SFT row's user turn>, "chosen": <its answer>, "rejected": <a wrong answer>}.
The prompt is `alpaca_prompt(instruction, input)` (instruction, blank line, sentence), exactly the user turn the
SFT row is trained with, so both tasks are prompted alike. The held-out split keeps the SFT task's disjoint names,
cities and sentence templates. Each wrong answer is one of the mistakes a small model makes on this task (see
peftkit/data/README.md), picked with `random.Random(seed)`; the output is byte-for-byte deterministic.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from make_dataset import write_jsonl  # scripts/make_dataset.py: the bundled SFT task's writer (same bytes)

DATA = Path(__file__).resolve().parent.parent / "peftkit" / "data"
ANSWER = re.compile(r"name=(?P<name>[^;]+); city=(?P<city>[^;]+); date=(?P<y>\d{4})-(?P<m>\d\d)-(?P<d>\d\d)")
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def _line(name: str, city: str, date: str) -> str:
    return f"name={name}; city={city}; date={date}"


def _swap_day_month(f: dict) -> str | None:  # 2021-03-05 -> 2021-05-03 (only when that is another valid date)
    return _line(f["name"], f["city"], f"{f['y']}-{f['d']}-{f['m']}") if f["d"] != f["m"] and int(f["d"]) <= 12 \
        else None


def _unpadded(f: dict) -> str | None:  # 2021-03-05 -> 2021-3-5
    date = f"{f['y']}-{int(f['m'])}-{int(f['d'])}"
    return _line(f["name"], f["city"], date) if date != f"{f['y']}-{f['m']}-{f['d']}" else None


def _wrong_year(f: dict) -> str:
    return _line(f["name"], f["city"], f"{int(f['y']) + 1}-{f['m']}-{f['d']}")


def _swapped_fields(f: dict) -> str:  # name and city exchanged
    return _line(f["city"], f["name"], f"{f['y']}-{f['m']}-{f['d']}")


def _first_name_only(f: dict) -> str:
    return _line(f["name"].split()[0], f["city"], f"{f['y']}-{f['m']}-{f['d']}")


def _date_as_written(f: dict) -> str:  # the date not normalised
    return _line(f["name"], f["city"], f"{MONTHS[int(f['m']) - 1]} {int(f['d'])}, {f['y']}")


def _prose(f: dict) -> str:
    return f"{f['name']} was in {f['city']} on {f['y']}-{f['m']}-{f['d']}."


def _missing_date(f: dict) -> str:
    return f"name={f['name']}; city={f['city']}"


MISTAKES: list[Callable[[dict], str | None]] = [_swap_day_month, _unpadded, _wrong_year, _swapped_fields,
                                                _first_name_only, _date_as_written, _prose, _missing_date]


# Share of rows whose wrong answer is the input sentence repeated: the untrained model's most common failure, and
# the one it prefers to the right answer (copying is easy); the other mistakes it already ranks below the answer.
COPY_SHARE = 0.4


def to_pair(row: dict, rng: random.Random) -> dict:
    """The SFT row as a preference row: the rejected answer is the sentence repeated (COPY_SHARE of the rows) or
    a wrong line drawn from MISTAKES (one that applies)."""
    fields = ANSWER.fullmatch(row["output"]).groupdict()
    choices = rng.sample(MISTAKES, len(MISTAKES))
    rejected = next(wrong for mistake in choices if (wrong := mistake(fields)) is not None)
    if rng.random() < COPY_SHARE:
        rejected = row["input"]
    return {"prompt": f"{row['instruction']}\n\n{row['input']}", "chosen": row["output"], "rejected": rejected}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=500, help="number of training pairs (from task_train.jsonl)")
    ap.add_argument("--out", type=Path, default=DATA)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    train = [to_pair(row, rng) for row in read_jsonl(DATA / "task_train.jsonl")[: args.train]]
    held_out = [to_pair(row, rng) for row in read_jsonl(DATA / "task_eval.jsonl")]
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "preference_train.jsonl", train)
    write_jsonl(args.out / "preference_eval.jsonl", held_out)
    print(f"wrote {len(train)} train and {len(held_out)} eval pairs to {args.out}")


if __name__ == "__main__":
    main()

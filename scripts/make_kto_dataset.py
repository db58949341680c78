"""Generate peftkit's bundled unpaired (KTO) task from the bundled SFT task: label true = its answer, label false =
a plausible wrong one.

Usage:  python scripts/make_kto_dataset.py [--seed 0] [--train 500] [--out peftkit/data]

Reads peftkit/data/task_train.jsonl and task_eval.jsonl (written by scripts/make_dataset.py) and writes TRL's
unpaired preference format, {"prompt": <the SFT row's user turn>, "completion": <an answer>, "label": <bool>}:

- kto_train.jsonl: the first --train SFT training rows, ONE row per prompt (unpaired, as KTO is meant for): the
  right answer with probability 1/2, else a wrong one;
- kto_eval.jsonl: every held-out row twice, its right answer then a wrong one (adjacent), so that the held-out
  preference accuracy compares the two completions of each prompt. The held-out split keeps the SFT task's
  disjoint names, cities and sentence templates.

Wrong answers are make_preference_dataset.py's (the mistakes a small model makes on this task, or the sentence
repeated), drawn with `random.Random(seed)`; the output is byte-for-byte deterministic.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from make_dataset import write_jsonl  # scripts/make_dataset.py: the bundled SFT task's writer (same bytes)
from make_preference_dataset import DATA, read_jsonl, to_pair


def unpaired_row(row: dict, rng: random.Random) -> dict:
    """One KTO row: the right answer (label true) or a wrong one (false), with equal odds."""
    pair = to_pair(row, rng)
    good = rng.random() < 0.5
    return {"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"], "label": good}


def held_out_rows(row: dict, rng: random.Random) -> list[dict]:
    """Both completions of a held-out prompt: the right answer, then a wrong one."""
    pair = to_pair(row, rng)
    return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=500, help="number of training rows (from task_train.jsonl)")
    ap.add_argument("--out", type=Path, default=DATA)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    train = [unpaired_row(row, rng) for row in read_jsonl(DATA / "task_train.jsonl")[: args.train]]
    held_out = [r for row in read_jsonl(DATA / "task_eval.jsonl") for r in held_out_rows(row, rng)]
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "kto_train.jsonl", train)
    write_jsonl(args.out / "kto_eval.jsonl", held_out)
    print(f"wrote {len(train)} train rows ({sum(r['label'] for r in train)} desirable) and {len(held_out)} eval "
          f"rows to {args.out}")


if __name__ == "__main__":
    main()

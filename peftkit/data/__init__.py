"""The training data pipeline: rows -> token ids + labels -> micro-batches.

    rows = load_rows("data.jsonl")                       # sources.py: file, save_to_disk folder, hub name
    ds = tokenize(rows, tokenizer, max_length=512)       # formats.py + rendering.py + tokenizing.py (cached)
    for indices in batches(ds["length"], batch_size=4, max_length=512, packing=True, shuffle=True, seed=0):
        batch = collate([ds[i] for i in indices], tokenizer.pad_token_id, packing=True)   # collator.py
        loss = model(**batch_without_num_targets, use_cache=False).loss ...

See docs/data.md for the formats, the plain template, masking and packing. This folder also holds the bundled
task (task_train.jsonl, task_eval.jsonl), found with `bundled_task()`.
"""

from __future__ import annotations

from pathlib import Path

from peftkit.data.batching import batches
from peftkit.data.collator import IGNORE_INDEX, collate
from peftkit.data.formats import FORMATS, detect_format
from peftkit.data.sources import load_rows
from peftkit.data.tokenizing import tokenize

DATA_DIR = Path(__file__).parent


def bundled_task(split: str = "train") -> Path:
    """Path of the bundled task's JSONL file for split "train" or "eval"."""
    return DATA_DIR / f"task_{split}.jsonl"


__all__ = ["FORMATS", "IGNORE_INDEX", "batches", "bundled_task", "collate", "detect_format", "load_rows",
           "tokenize"]

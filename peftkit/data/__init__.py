"""The training data pipeline: rows -> token ids + labels -> micro-batches.

    rows = load_rows("data.jsonl")                       # sources.py: file, save_to_disk folder, hub name
    rows = load_mixture("a.jsonl:0.7,b.jsonl:0.3", columns={"instruction": "question"}, seed=0)  # mixing.py
    ds = tokenize(rows, tokenizer, max_length=512)       # formats.py + rendering.py + tokenizing.py (cached)
    for indices in batches(ds["length"], batch_size=4, max_length=512, packing=True, shuffle=True, seed=0):
        batch = collate([ds[i] for i in indices], tokenizer.pad_token_id, packing=True)   # collator.py
        loss = model(**batch_without_num_targets, use_cache=False).loss ...

See docs/data.md for the formats, the plain template, masking and packing. This folder also holds the bundled
task: BUNDLED_TRAIN and BUNDLED_EVAL (task_train.jsonl, task_eval.jsonl; README.md says how they were made).
"""

from __future__ import annotations

from pathlib import Path

from peftkit.data.batching import batches
from peftkit.data.collator import IGNORE_INDEX, collate
from peftkit.data.formats import FORMATS, detect_format
from peftkit.data.mixing import load_mixture
from peftkit.data.sources import load_rows
from peftkit.data.tokenizing import tokenize

BUNDLED_TRAIN = Path(__file__).parent / "task_train.jsonl"
BUNDLED_EVAL = Path(__file__).parent / "task_eval.jsonl"
# the same task as preference pairs (chosen = the answer, rejected = a plausible wrong one): README.md
BUNDLED_PREFERENCE_TRAIN = Path(__file__).parent / "preference_train.jsonl"
BUNDLED_PREFERENCE_EVAL = Path(__file__).parent / "preference_eval.jsonl"
# the same task as unpaired rows for KTO (label true: the answer, false: a wrong one): README.md
BUNDLED_KTO_TRAIN = Path(__file__).parent / "kto_train.jsonl"
BUNDLED_KTO_EVAL = Path(__file__).parent / "kto_eval.jsonl"


__all__ = ["BUNDLED_EVAL", "BUNDLED_KTO_EVAL", "BUNDLED_KTO_TRAIN", "BUNDLED_PREFERENCE_EVAL", "BUNDLED_PREFERENCE_TRAIN", "BUNDLED_TRAIN", "FORMATS",
           "IGNORE_INDEX", "batches", "collate", "detect_format", "load_mixture", "load_rows", "tokenize"]

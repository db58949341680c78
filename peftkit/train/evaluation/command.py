"""Evaluate a model, or a model with an adapter, on held-out data: the library behind `peftkit eval`.

Prompts are rendered with the adapter's saved prompt format (else the tokenizer's chat template, else the plain
template), exactly as in training; the loss counts only the answer tokens, like the training loss; exact match
compares greedy answers with the references where rows have them (train/evaluation/heldout.py).
"""

from __future__ import annotations

from typing import Any

from peftkit import data
from peftkit.errors import PeftkitError
from peftkit.train.evaluation.heldout import eval_loss, exact_match, row_to_chat
from peftkit.train.evaluation.loading import load_for_inference
from peftkit.train.loop.loss import loss_path
from peftkit.train.loop.shared_prefix import sharing_blocker
from peftkit.train.splits import Split, collate_fn


def evaluate(model_name: str | None, adapter: str | None, source: str | None = None, *, fmt: str = "auto",
             split: str | None = None, max_examples: int = 50, max_length: int = 512, batch_size: int = 8,
             dequantized: bool = False) -> dict[str, Any]:
    """`peftkit eval`: load the model (and adapter, `loading.load_for_inference`), then loss / perplexity and, with
    references, exact match.

    source: data file / folder / hub name (default: the bundled task's eval split).
    """
    source = source or str(data.BUNDLED_EVAL)
    rows = data.load_rows(source, split=split)
    if len(rows) == 0:
        raise PeftkitError(f"the data {source!r} has no rows")
    rows = rows.select(range(min(len(rows), max_examples)))
    fmt = data.detect_format(rows.column_names) if fmt == "auto" else fmt
    loaded = load_for_inference(model_name, adapter, dequantized=dequantized)
    lm, tokenizer, prompt_format = loaded.model, loaded.tokenizer, loaded.prompt_format
    ds = data.tokenize(rows, tokenizer, fmt=fmt, max_length=max_length, prompt_format=prompt_format)
    if len(ds) == 0:
        raise PeftkitError(f"no example has an answer token within --max-length {max_length}")
    tokenized = Split(ds["input_ids"][:], ds["labels"][:], ds["length"][:], [])  # lists, not datasets Columns
    share = sharing_blocker(lm, packing=False, checkpointing=False, sharded=False) is None
    collate = collate_fn(tokenized, tokenizer.pad_token_id, False, next(lm.parameters()).device, share)

    plan = [list(range(i, min(i + batch_size, len(ds)))) for i in range(0, len(ds), batch_size)]
    result: dict[str, Any] = {"format": fmt, "n_examples": len(ds), **eval_loss(lm, collate, plan,
                                                                                 loss_path(lm))}
    if fmt in ("alpaca", "messages"):
        refs = [row_to_chat(row, fmt, i) for i, row in enumerate(rows)]
        result.update(exact_match(lm, tokenizer, [(chat, ref) for chat, ref in refs if ref is not None], prompt_format))
    return result

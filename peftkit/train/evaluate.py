"""Evaluation: held-out loss / perplexity, and exact match of greedy answers against references.

Exact match generates for many prompts at once: prompts are left-padded (so every row's answer starts at the same
column and the attention mask hides the padding), decoded greedily until the end token, and compared with the
reference after stripping surrounding whitespace. Prompts are rendered with the prompt format used in training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftkit.data.prompting import render_prompt
from peftkit.train.loss import count_targets, micro_loss


def row_to_chat(row: dict[str, Any], fmt: str, index: int = 0) -> tuple[list[dict[str, str]], str | None]:
    """(prompt messages, reference answer) of one raw row: the turns before the last assistant turn, and its text.

    Text rows have no reference (None). The row becomes a conversation exactly as in training (peftkit.data).
    """
    from peftkit.data.formats import to_example

    example = to_example(row, fmt, index)
    if isinstance(example, str):
        return [], None
    last = max(i for i, m in enumerate(example) if m["role"] == "assistant")
    return example[:last], example[last]["content"]


@torch.no_grad()
def eval_loss(model: nn.Module, collate: Callable[[list[int]], dict], batches: list[list[int]],
              path: str = "fused") -> dict[str, float]:
    """Mean token loss and perplexity over `batches` (lists of example indices of a tokenized dataset)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for indices in batches:
        batch = collate(indices)
        total += float(micro_loss(model, batch, path))
        n += count_targets(batch)
    model.train(was_training)
    loss = total / max(n, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "targets": n}


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer: Any, examples: list[tuple[list[dict], str]],
                prompt_format: dict | None, batch_size: int = 25, max_new_tokens: int | None = None) -> dict:
    """Share of examples whose greedy answer equals the reference; also returns a few (prompt, got, want) samples.

    examples: (prompt messages, reference). max_new_tokens defaults to the longest reference + 8 tokens.
    """
    if not examples:
        return {"exact_match": None, "n": 0, "samples": []}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if max_new_tokens is None:
        longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for _, ref in examples)
        max_new_tokens = longest + 8
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            texts = [render_prompt(tokenizer, messages, prompt_format) for messages, _ in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]                       # [b, <= max_new_tokens]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    hits = [a.strip() == ref.strip() for a, (_, ref) in zip(answers, examples, strict=True)]
    samples = [{"prompt": m[-1]["content"], "answer": a.strip(), "reference": r}
               for a, (m, r) in list(zip(answers, examples, strict=True))[:3]]
    return {"exact_match": sum(hits) / len(hits), "n": len(hits), "samples": samples}

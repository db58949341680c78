"""Evaluation: held-out loss / perplexity, and exact match of greedy answers against references.

Exact match generates for many prompts at once: prompts are left-padded (so every row's answer starts at the same
column and the attention mask hides the padding; a prefix all prompts share is computed once, shared_prefix.py),
decoded greedily until the end token, and compared with the
reference after stripping surrounding whitespace. Prompts are rendered with the prompt format used in training.
A row stops as soon as its answer so far can no longer equal its reference (`Diverged`): a miss is a miss whatever
follows, and the batch ends when every row has stopped, so an untrained model's rambling does not set the pace.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from peftkit.data.prompting import render_prompt
from peftkit.train.loss import count_targets, micro_loss
from peftkit.train.shared_prefix import prompt_batch

GENERATE_TOKENS = 8192  # exact match's batches: rows x (prompt + answer) tokens of KV cache, ~4 GB for a 7B model


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
                prompt_format: dict | None, batch_tokens: int = GENERATE_TOKENS,
                max_new_tokens: int | None = None) -> dict:
    """Share of examples whose greedy answer equals the reference; also returns a few (prompt, got, want) samples.

    examples: (prompt messages, reference). max_new_tokens defaults to the longest reference + 8 tokens.
    batch_tokens bounds each generate() batch: rows x (longest prompt + max_new_tokens), i.e. its KV cache.
    """
    if not examples:
        return {"exact_match": None, "n": 0, "samples": []}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if max_new_tokens is None:
        longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for _, ref in examples)
        max_new_tokens = longest + 8
    answers: list[str] = []
    stopped: list[bool] = []
    texts = [render_prompt(tokenizer, messages, prompt_format) for messages, _ in examples]
    all_prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
    try:
        for rows in _token_batches([len(p) + max_new_tokens for p in all_prompts], batch_tokens):
            chunk, prompts = [examples[i] for i in rows], [all_prompts[i] for i in rows]
            enc = prompt_batch(model, prompts, tokenizer.pad_token_id, device)  # a shared prefix computed once
            diverged = Diverged(tokenizer, [ref for _, ref in chunk], enc["input_ids"].shape[1])
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 stopping_criteria=StoppingCriteriaList([diverged]))
            new = out[:, enc["input_ids"].shape[1]:]                       # [b, <= max_new_tokens]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
            stopped += diverged.stopped
    finally:
        model.train(was_training)
    hits = [a.strip() == ref.strip() for a, (_, ref) in zip(answers, examples, strict=True)]
    samples = [{"prompt": m[-1]["content"], "answer": a.strip(), "reference": r, **({"cut": True} if cut else {})}
               for a, (m, r), cut in list(zip(answers, examples, stopped, strict=True))[:3]]
    return {"exact_match": sum(hits) / len(hits), "n": len(hits), "samples": samples}


def _token_batches(lengths: list[int], budget: int) -> list[range]:
    """Consecutive rows in batches whose padded size (rows x longest) stays within `budget` (at least one row)."""
    batches, start, longest = [], 0, 0
    for i, length in enumerate(lengths):
        if i > start and (i - start + 1) * max(longest, length) > budget:
            batches.append(range(start, i))
            start, longest = i, 0
        longest = max(longest, length)
    return [*batches, range(start, len(lengths))] if lengths else batches


class Diverged(StoppingCriteria):
    """Stops each row of a greedy batch once its answer can no longer equal its reference (exact match is lost).

    The answer so far is decoded and compared with the reference as text, conservatively: everything from a
    replacement character on (a multi-byte character still being spelled out in byte tokens) and its last
    character are ignored, so a decode that later tokens can still change never stops a row. `stopped[i]` records
    which rows were cut (their text ends where it went wrong).
    """

    def __init__(self, tokenizer: Any, references: list[str], start: int) -> None:
        self.tokenizer, self.references, self.start = tokenizer, [r.strip() for r in references], start
        self.stopped = [False] * len(references)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        for row, (text, reference) in enumerate(zip(texts, self.references, strict=True)):
            settled = text.split("\ufffd", 1)[0].strip()[:-1].rstrip()
            self.stopped[row] = self.stopped[row] or not reference.startswith(settled)
        return torch.tensor(self.stopped, dtype=torch.bool, device=input_ids.device)

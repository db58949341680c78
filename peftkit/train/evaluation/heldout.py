"""Evaluation: held-out loss / perplexity, and exact match of greedy answers against references.

Exact match renders each prompt with the prompt format used in training, takes the greedy answer
(train/evaluation/generation.py: the reference is checked as a draft in one forward pass, and only the rows it does not match
generate, each stopping once it can no longer match), and compares it with the reference after stripping
surrounding whitespace.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.data.prompting import render_prompt
from peftkit.train.evaluation.generation import GENERATE_TOKENS, greedy_answers, token_batches
from peftkit.train.loop.loss import count_targets, micro_loss

if TYPE_CHECKING:
    from peftkit.io.models import CausalLM


def row_to_chat(row: dict[str, Any], fmt: str, index: int = 0) -> tuple[list[dict[str, str]], str | None]:
    """(prompt messages, reference answer) of one raw row: the turns before the last assistant turn, and its text.

    Text rows have no reference (None). The row becomes a conversation exactly as in training (peftkit.data). Only
    alpaca and messages rows are asked for (the callers check `fmt`); a standard prompt_completion row (a
    `Completion`) has no conversation either, so it gets no reference, like text.
    """
    from peftkit.data.formats import to_example

    example = to_example(row, fmt, index)
    if not isinstance(example, list):
        return [], None
    last = max(i for i, m in enumerate(example) if m["role"] == "assistant")
    return example[:last], example[last]["content"]


def references(rows: Any, fmt: str) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages, reference answer) of every row that has a reference (`row_to_chat`): what exact match
    scores. Only alpaca and messages rows have references; any other format gives none."""
    if fmt not in ("alpaca", "messages"):
        return []
    pairs = (row_to_chat(row, fmt, i) for i, row in enumerate(rows))
    return [(chat, ref) for chat, ref in pairs if ref is not None]


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
def exact_match(model: CausalLM, tokenizer: Any, examples: list[tuple[list[dict], str]],
                prompt_format: dict | None, batch_tokens: int = GENERATE_TOKENS,
                max_new_tokens: int | None = None) -> dict:
    """Share of examples whose greedy answer equals the reference; also returns a few (prompt, got, want) samples.

    examples: (prompt messages, reference). max_new_tokens defaults to the longest reference + 8 tokens.
    batch_tokens bounds each batch: rows x (longest prompt + max_new_tokens), i.e. its KV cache.
    """
    if not examples:
        return {"exact_match": None, "n": 0, "samples": []}
    was_training = model.training
    model.eval()
    if max_new_tokens is None:
        max_new_tokens = answer_tokens(tokenizer, [ref for _, ref in examples])
    answers: list[str] = []
    stopped: list[bool] = []
    texts = [render_prompt(tokenizer, messages, prompt_format) for messages, _ in examples]
    all_prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
    try:
        for rows in token_batches([len(p) + max_new_tokens for p in all_prompts], batch_tokens):
            got, cut = greedy_answers(model, tokenizer, [all_prompts[i] for i in rows],
                                      [examples[i][1] for i in rows], max_new_tokens)
            answers += got
            stopped += cut
    finally:
        model.train(was_training)
    return match_result(answers, examples, stopped)


def answer_tokens(tokenizer: Any, references: list[str]) -> int:
    """Exact match's answer length: the longest reference's tokens + 8."""
    return max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for ref in references) + 8


def match_result(answers: list[str], examples: list[tuple[list[dict], str]], cut: list[bool] | None = None) -> dict:
    """{"exact_match": share of answers equal to their reference once stripped, "n", "samples": the first three
    (prompt, answer, reference, and `cut` where the answer was cut short as a sure miss)}."""
    cut = cut or [False] * len(answers)
    hits = [a.strip() == ref.strip() for a, (_, ref) in zip(answers, examples, strict=True)]
    samples = [{"prompt": m[-1]["content"], "answer": a.strip(), "reference": r, **({"cut": True} if c else {})}
               for a, (m, r), c in list(zip(answers, examples, cut, strict=True))[:3]]
    return {"exact_match": sum(hits) / len(hits), "n": len(hits), "samples": samples}

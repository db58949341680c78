"""Unpaired preference rows (KTO) -> token ids of each completion and of its mismatched "KL" row -> micro-batches.

A row is TRL's unpaired preference format: `prompt`, `completion` and a boolean `label` (True: desirable), in two
shapes told apart by the values: **text** (two strings: one user turn, one assistant turn) or **conversational**
(`prompt` a list of `{role, content}` messages, `completion` a list ending with the assistant message). Each row is
rendered and masked exactly like a preference response (`preference.encode_response`): only the completion's
tokens are targets.

KTO estimates the KL term from mismatched (prompt, completion) pairs: example i's KL row is its prompt followed by
the completion of example i - 1 (the last example's for the first), fixed when the data is loaded. TRL pairs each
row with the previous row of its batch (its sequential sampler makes a batch a chunk of the dataset); fixing the
partner per example instead lets the reference log-probs of the KL rows be precomputed once, and keeps the
estimate independent of how length-sorted batches fall.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from peftkit.core.labels import IGNORE_INDEX
from peftkit.data.collator import collate
from peftkit.data.formats import parse_messages
from peftkit.data.preference import Messages, encode_response
from peftkit.errors import PeftkitError

UNPAIRED_COLUMNS = ("prompt", "completion", "label")
log = logging.getLogger("peftkit.data")


def is_unpaired(column_names: Iterable[str]) -> bool:
    """Whether the data has the columns of unpaired preference rows (`prompt`, `completion`, `label`)."""
    return all(name in list(column_names) for name in UNPAIRED_COLUMNS)


def to_unpaired(row: dict[str, Any], index: int) -> tuple[Messages, Messages, bool]:
    """(prompt messages, completion messages, desirable) of one row; errors name the row (1-based)."""
    where = f"row {index + 1}"
    prompt, completion, label = row.get("prompt"), row.get("completion"), row.get("label")
    if not isinstance(label, bool):
        raise PeftkitError(f"{where}: 'label' must be true (desirable) or false (undesirable), got {label!r:.40}")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}], [{"role": "assistant", "content": completion}], label
    if not isinstance(prompt, list | str) or not isinstance(completion, list) or not completion or not prompt:
        raise PeftkitError(f"{where}: 'prompt' and 'completion' must both be text or both be message lists")
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
        parse_messages(prompt, f"{where} (prompt)", need_answer=False)
    answer = parse_messages(completion, f"{where} (completion)", need_answer=False)
    if answer[-1]["role"] != "assistant":
        raise PeftkitError(f"{where}: 'completion' must end with an assistant message")
    return turns, answer, label


@dataclass
class Unpaired:
    """Tokenized unpaired rows as plain lists: each example's own row, its KL row, its label, the id of its prompt
    (rows with the same prompt share it: the held-out preference accuracy compares them), and `references`
    (prompt messages, desirable completion) for exact match."""

    ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    kl_ids: list[list[int]] = field(default_factory=list)
    kl_labels: list[list[int]] = field(default_factory=list)
    desirable: list[bool] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    references: list[tuple[Messages, str]] = field(default_factory=list)
    ref_logps: list[float] | None = None      # the reference's log-prob sums, when precomputed (--precompute-ref)
    ref_kl_logps: list[float] | None = None

    @property
    def lengths(self) -> list[int]:
        """Tokens of each example (own row + KL row): what batching sorts by and what tokens/s counts."""
        return [len(a) + len(b) for a, b in zip(self.ids, self.kl_ids, strict=True)]

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_unpaired(rows: Iterable[dict[str, Any]], tokenizer: Any, *, max_length: int,
                      prompt_format: dict[str, str]) -> Unpaired:
    """Every row truncated to `max_length` tokens (rows left without targets dropped), then the KL rows."""
    import jinja2

    kept: list[tuple[Messages, Messages, bool]] = []
    out, dropped = Unpaired(), 0
    prompts: dict[str, int] = {}  # repr(prompt) -> its index
    for index, row in enumerate(rows):
        prompt, completion, label = to_unpaired(row, index)
        try:
            ids, labels = _encode(prompt, completion, tokenizer, prompt_format, max_length)
        except (jinja2.TemplateError, PeftkitError) as exc:
            raise PeftkitError(f"row {index + 1}: {exc}") from None
        if all(t == IGNORE_INDEX for t in labels):
            dropped += 1
            continue
        kept.append((prompt, completion, label))
        out.ids.append(ids)
        out.labels.append(labels)
        out.desirable.append(label)
        out.prompt_ids.append(prompts.setdefault(repr(prompt), len(prompts)))
        if label:
            out.references.append((prompt, completion[-1]["content"]))
    for i, (prompt, _, _) in enumerate(kept):  # the KL row: this prompt, the previous example's completion
        ids, labels = _encode(prompt, kept[i - 1][1], tokenizer, prompt_format, max_length)
        out.kl_ids.append(ids)
        out.kl_labels.append(labels)
    if dropped:
        log.warning("%d unpaired rows dropped: --max-length %d cut all the tokens of the completion", dropped,
                    max_length)
    return out


def _encode(prompt: Messages, completion: Messages, tokenizer: Any, prompt_format: dict[str, str],
            max_length: int) -> tuple[list[int], list[int]]:
    ids, labels = encode_response(prompt, completion, tokenizer, prompt_format)
    return ids[:max_length], labels[:max_length]


def collate_unpaired(data: Unpaired, indices: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One micro-batch: the examples' rows [B, T] (input_ids, labels, attention_mask), their KL rows [B, T']
    (kl_input_ids, kl_labels, kl_attention_mask), `desirable` [B] (bool), and `ref_logps` / `ref_kl_logps` [B]
    when the reference log-probs were precomputed."""
    own = collate([{"input_ids": data.ids[i], "labels": data.labels[i]} for i in indices], pad_token_id, False)
    kl = collate([{"input_ids": data.kl_ids[i], "labels": data.kl_labels[i]} for i in indices], pad_token_id, False)
    batch = {k: v for k, v in own.items() if isinstance(v, torch.Tensor)}
    batch.update({f"kl_{k}": v for k, v in kl.items() if isinstance(v, torch.Tensor)})
    batch["desirable"] = torch.tensor([data.desirable[i] for i in indices], dtype=torch.bool)
    batch["prompt_ids"] = torch.tensor([data.prompt_ids[i] for i in indices], dtype=torch.long)
    if data.ref_logps is not None and data.ref_kl_logps is not None:
        batch["ref_logps"] = torch.tensor([data.ref_logps[i] for i in indices], dtype=torch.float32)
        batch["ref_kl_logps"] = torch.tensor([data.ref_kl_logps[i] for i in indices], dtype=torch.float32)
    return batch

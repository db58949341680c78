"""Preference rows -> token ids for chosen and rejected responses -> one micro-batch holding both.

A preference row has `prompt`, `chosen` and `rejected` (TRL's standard preference format), in one of two shapes,
told apart by the values (`pair_kind`):

- **text**: three strings. The prompt becomes one user turn, each response one assistant turn.
- **conversational**: `prompt` is a list of `{role, content}` messages, `chosen` / `rejected` are lists holding the
  assistant message(s). Without a `prompt` column (TRL's "implicit prompt"), chosen and rejected are whole
  conversations that share everything but their last assistant turn, which is the response.

Each side is the conversation `prompt + response`, rendered and tokenized exactly like an SFT row
(`tokenizing.encode_example`: the chat template, or the plain template + EOS), then masked so that only the
response's tokens are targets: assistant turns inside the prompt are context, not scored. A pair whose chosen or
rejected side loses all its targets to `max_length` is dropped.

`collate_pairs` stacks the chosen rows, then the rejected rows, into one padded batch [2B, T], so one forward
scores both (rows 0..B-1 chosen, B..2B-1 rejected).
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
from peftkit.data.rendering import render_segments, uses_special_prefix
from peftkit.data.tokenizing import encode_segments
from peftkit.errors import PeftkitError

PAIR_COLUMNS = ("chosen", "rejected")
log = logging.getLogger("peftkit.data")

Messages = list[dict[str, str]]


def is_preference(column_names: Iterable[str]) -> bool:
    """Whether the data has the columns of preference rows (`chosen` and `rejected`)."""
    return all(name in list(column_names) for name in PAIR_COLUMNS)


def pair_kind(row: dict[str, Any]) -> str:
    """"conversational" when the responses are message lists, else "text"."""
    return "conversational" if isinstance(row.get("chosen"), list) else "text"


def to_pair(row: dict[str, Any], index: int) -> tuple[Messages, Messages, Messages]:
    """(prompt messages, chosen messages, rejected messages) of one row; errors name the row (1-based)."""
    where = f"row {index + 1}"
    missing = [name for name in PAIR_COLUMNS if row.get(name) is None]
    if missing:
        raise PeftkitError(f"{where}: a preference row needs 'chosen' and 'rejected'; {missing} missing")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise PeftkitError(f"{where}: with text responses, 'prompt' must be text too, got {prompt!r:.60}")
        return ([{"role": "user", "content": prompt}], [{"role": "assistant", "content": chosen}],
                [{"role": "assistant", "content": rejected}])
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise PeftkitError(f"{where}: 'chosen' and 'rejected' must both be text or both be message lists")
    if prompt is None:
        return _implicit_prompt(chosen, rejected, where)
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _turns(prompt, where, "prompt")
    return prompt, _response(chosen, where, "chosen"), _response(rejected, where, "rejected")


def _implicit_prompt(chosen: list, rejected: list, where: str) -> tuple[Messages, Messages, Messages]:
    """Whole conversations: the shared beginning is the prompt, the differing last turn the response."""
    chosen, rejected = _turns(chosen, where, "chosen"), _turns(rejected, where, "rejected")
    if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
        raise PeftkitError(f"{where}: without a 'prompt' column, 'chosen' and 'rejected' must be conversations "
                           "that differ only in their last (assistant) turn")
    return chosen[:-1], _response(chosen[-1:], where, "chosen"), _response(rejected[-1:], where, "rejected")


def _turns(value: Any, where: str, name: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise PeftkitError(f"{where}: {name!r} must be a non-empty list of {{role, content}}, got {value!r:.60}")
    return parse_messages(value, f"{where} ({name})", need_answer=False)


def _response(value: list, where: str, name: str) -> Messages:
    turns = _turns(value, where, name)
    if turns[-1]["role"] != "assistant":
        raise PeftkitError(f"{where}: {name!r} must end with an assistant message, got role {turns[-1]['role']!r}")
    return turns


def encode_response(prompt: Messages, response: Messages, tokenizer: Any,
                    prompt_format: dict[str, str]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of `prompt + response`, tokenized like an SFT row; only the response is a target."""
    if prompt and prompt[-1]["role"] == "assistant":
        raise PeftkitError("the prompt ends with an assistant turn; the response must follow a user turn")
    conversation = prompt + response
    segments = render_segments(conversation, tokenizer, prompt_format)
    skip = sum(m["role"] == "assistant" for m in prompt)  # assistant turns of the prompt: context only
    marked, runs, previous = [], 0, False
    for piece, target in segments:
        runs += target and not previous   # a run of target segments is one assistant turn
        previous = target
        marked.append((piece, target and runs > skip))
    ids, targets = encode_segments(tokenizer, marked, uses_special_prefix(conversation, prompt_format))
    labels = [tok if target else IGNORE_INDEX for tok, target in zip(ids, targets, strict=True)]
    if labels:
        labels[0] = IGNORE_INDEX
    return ids, labels


@dataclass
class Pairs:
    """Tokenized preference pairs as plain lists; `references` are (prompt messages, chosen text) for exact match."""

    chosen_ids: list[list[int]] = field(default_factory=list)
    chosen_labels: list[list[int]] = field(default_factory=list)
    rejected_ids: list[list[int]] = field(default_factory=list)
    rejected_labels: list[list[int]] = field(default_factory=list)
    references: list[tuple[Messages, str]] = field(default_factory=list)
    ref_chosen: list[float] | None = None    # DPO's reference log-prob sums, when precomputed (--precompute-ref)
    ref_rejected: list[float] | None = None

    @property
    def lengths(self) -> list[int]:
        """Tokens of each pair (chosen + rejected): what batching sorts by and what tokens/s counts."""
        return [len(c) + len(r) for c, r in zip(self.chosen_ids, self.rejected_ids, strict=True)]

    def __len__(self) -> int:
        return len(self.chosen_ids)


def tokenize_pairs(rows: Iterable[dict[str, Any]], tokenizer: Any, *, max_length: int,
                   prompt_format: dict[str, str]) -> Pairs:
    """Every row as a pair truncated to `max_length` tokens per side; pairs left without targets are dropped."""
    import jinja2

    pairs, dropped = Pairs(), 0
    for index, row in enumerate(rows):
        prompt, chosen, rejected = to_pair(row, index)
        try:
            sides = [encode_response(prompt, response, tokenizer, prompt_format) for response in (chosen, rejected)]
        except (jinja2.TemplateError, PeftkitError) as exc:
            raise PeftkitError(f"row {index + 1}: {exc}") from None
        (c_ids, c_labels), (r_ids, r_labels) = [(ids[:max_length], labels[:max_length]) for ids, labels in sides]
        if all(label == IGNORE_INDEX for label in c_labels) or all(label == IGNORE_INDEX for label in r_labels):
            dropped += 1
            continue
        pairs.chosen_ids.append(c_ids)
        pairs.chosen_labels.append(c_labels)
        pairs.rejected_ids.append(r_ids)
        pairs.rejected_labels.append(r_labels)
        pairs.references.append((prompt, chosen[-1]["content"]))
    if dropped:
        log.warning("%d preference pairs dropped: --max-length %d cut all the tokens of a response", dropped,
                    max_length)
    return pairs


def collate_pairs(pairs: Pairs, indices: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One padded batch [2B, T]: the B chosen rows of `indices`, then their B rejected rows (+ `ref_chosen` and
    `ref_rejected` [B] when the reference log-probs were precomputed)."""
    rows = [{"input_ids": pairs.chosen_ids[i], "labels": pairs.chosen_labels[i]} for i in indices]
    rows += [{"input_ids": pairs.rejected_ids[i], "labels": pairs.rejected_labels[i]} for i in indices]
    batch = collate(rows, pad_token_id, packing=False)
    if pairs.ref_chosen is not None and pairs.ref_rejected is not None:
        batch["ref_chosen"] = torch.tensor([pairs.ref_chosen[i] for i in indices], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([pairs.ref_rejected[i] for i in indices], dtype=torch.float32)
    return batch

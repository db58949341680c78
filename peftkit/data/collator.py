"""Micro-batch tensors from tokenized examples: padded rows, or one packed row.

Padded (packing=False): rows are right-padded to the longest; `attention_mask` is 1 on each example's real
positions and 0 after them. It is built from the example LENGTHS, never from `input_ids != pad_token_id`: the pad
token is often the EOS (SmolLM2: `<|im_end|>`), and masking by id would hide every real end token, so the model
would never learn to stop. `labels` are -100 on padding.

Packed (packing=True): the examples are concatenated into one row [1, total_tokens] with `position_ids` restarting
at 0 for each example and NO attention_mask. transformers (>= 4.44; measured on 5.x) then detects the restarts and
builds a block-diagonal causal mask, so no token attends across an example boundary. This holds only when the
model is called with `use_cache=False`: with a KV cache (the default in training mode) the packed examples attend
to each other: the mask is then built from the cache and ignores the restarts. Every example's first label is already -100 (tokenizing.py), so no
token is trained to predict the next example's first token.

Both return `num_targets`: the number of labels != -100, i.e. the tokens that the (shifted) loss counts, so the
training loop can divide the summed loss by the target count across all accumulated micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from peftkit.core.labels import IGNORE_INDEX


def collate(examples: list[dict[str, Any]], pad_token_id: int, packing: bool) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch. examples: dicts with `input_ids` and `labels` (lists or 1-D tensors).

    Padded: input_ids / attention_mask / labels [B, L_max]. Packed: input_ids / position_ids / labels [1, sum L]
    (call the model with use_cache=False). Both: num_targets, a 0-d long tensor.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    ids = [_as_list(example["input_ids"]) for example in examples]
    labels = [_as_list(example["labels"]) for example in examples]
    for row_ids, row_labels in zip(ids, labels, strict=True):
        if len(row_ids) != len(row_labels) or not row_ids:
            raise ValueError("every example needs non-empty input_ids and labels of the same length")
    batch = _packed(ids, labels) if packing else _padded(ids, labels, pad_token_id)
    batch["num_targets"] = (batch["labels"] != IGNORE_INDEX).sum()
    return batch


def _padded(ids: list[list[int]], labels: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(row) for row in ids])
    width = int(lengths.max())
    input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    label_tensor = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    for row, (row_ids, row_labels) in enumerate(zip(ids, labels, strict=True)):
        input_ids[row, : len(row_ids)] = torch.tensor(row_ids)
        label_tensor[row, : len(row_labels)] = torch.tensor(row_labels)
    # by position: 1 where column < the example's length, whatever token sits there
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_tensor}


def _packed(ids: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
    first_labels = []
    for row_labels in labels:
        first_labels.append([IGNORE_INDEX, *row_labels[1:]])  # never predict across a boundary
    return {
        "input_ids": torch.tensor([sum(ids, [])], dtype=torch.long),
        "position_ids": torch.tensor([[p for row in ids for p in range(len(row))]], dtype=torch.long),
        "labels": torch.tensor([sum(first_labels, [])], dtype=torch.long),
    }


def _as_list(values: Sequence[int] | torch.Tensor) -> list[int]:
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)

"""The training loss of one micro-batch: a *sum* of next-token cross-entropies over its target tokens.

Returning the sum (not the mean) is what makes gradient accumulation correct: the loop divides by the number of
target tokens in the whole optimizer step (all micro-batches, all processes), so every target token weighs the
same however the tokens fall into micro-batches. Averaging per micro-batch, as many trainers did, over-weights
tokens of short micro-batches.

Logits are computed only at positions that predict a target (`logits_to_keep`): the LM head (vocab x hidden) and
the softmax over a 49k vocabulary are a large share of a small model's compute, and prompt tokens need neither.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.labels import IGNORE_INDEX

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Number of predicted tokens in a micro-batch (labels after the first position that are not -100)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def supports_logits_to_keep(model: nn.Module) -> bool:
    """Whether the (unwrapped) model's forward accepts `logits_to_keep` (most HF causal LMs do)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def micro_loss(model: nn.Module, batch: dict[str, torch.Tensor], keep_logits: bool = True) -> torch.Tensor:
    """Sum over target tokens of -log p(token | prefix) for one micro-batch (a 0-d tensor with grad).

    batch: input_ids [B, T], labels [B, T] aligned with input_ids (-100 = no loss), and attention_mask [B, T]
    (padded rows) or position_ids [B, T] (packed rows; positions restart per example, no KV cache is built).
    """
    labels = batch["labels"]                                  # [B, T]
    targets = labels[:, 1:]                                   # [B, T-1]: the token predicted at position t
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if keep_logits:
        keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # [K] positions some row needs a logit at
        # Negative indices count from the end, so they stay right if a method prepends virtual tokens.
        logits = model(**inputs, use_cache=False, logits_to_keep=keep - labels.shape[1]).logits  # [B, K, V]
        targets = targets[:, keep]                            # [B, K]
    else:
        logits = model(**inputs, use_cache=False).logits[:, -labels.shape[1]:-1]  # [B, T-1, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

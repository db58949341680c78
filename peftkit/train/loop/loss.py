"""The training loss of one micro-batch: a *sum* of next-token cross-entropies over its target tokens.

Returning the sum (not the mean) is what makes gradient accumulation correct: the loop divides by the number of
target tokens in the whole optimizer step (all micro-batches, all processes), so every target token weighs the
same however the tokens fall into micro-batches. Averaging per micro-batch, as many trainers did, over-weights
tokens of short micro-batches.

Three paths, best first (`loss_path` picks the best the model allows):

    fused  the model runs with its LM head turned into the identity, at the positions that predict a target
           (`logits_to_keep`), so it returns hidden states; the exact target rows then go through the head and the
           cross-entropy in chunks (linear_ce.py), never materialising the logits. Needs a plain nn.Linear head whose
           output the model does not post-process (no logit soft-capping or scaling).
    keep   logits only at positions some row needs (`logits_to_keep`): the LM head (vocab x hidden) and the softmax
           over a 49k vocabulary are a large share of a small model's compute, and prompt tokens need neither.
    full   logits everywhere (models whose forward has no `logits_to_keep`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.labels import IGNORE_INDEX
from peftkit.train.loop.linear_ce import linear_cross_entropy
from peftkit.train.loop.shared_prefix import KEY as SHARED_KEY
from peftkit.train.loop.shared_prefix import shared_forward

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Number of predicted tokens in a micro-batch (labels after the first position that are not -100)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


LOSS_PATHS = ("fused", "keep", "full")
# Config fields that make a causal LM post-process its LM head's output (the fused path would skip that).
POST_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def loss_path(model: nn.Module) -> str:
    """The best loss path the (unwrapped) model allows: "fused", "keep" or "full" (see the module docstring)."""
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return "full"
    return "fused" if plain_head(model) is not None else "keep"


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The model's LM head when the fused path can stand in for it: a plain nn.Linear (not an adapter wrapper, not
    hooked by accelerate) whose output the model returns as it is."""
    inner = getattr(model, "module", model)  # DDP
    get_head = getattr(inner, "get_output_embeddings", None)  # a PreTrainedModel's
    head = get_head() if get_head is not None else None
    config = getattr(inner, "config", None)
    if type(head) is not nn.Linear or "forward" in vars(head) or config is None or _sharded(head.weight):
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text, name, None) not in (None, 1.0) for name in POST_HEAD_FIELDS):
        return None
    return head


def _sharded(weight: torch.Tensor) -> bool:
    """A weight that is not whole outside the module's own forward: an FSDP2 DTensor, a DeepSpeed ZeRO-3
    partition (`ds_id`). The fused path uses the head's weight after the model's forward, so it needs it whole."""
    from torch.distributed.tensor import DTensor

    return isinstance(weight, DTensor) or hasattr(weight, "ds_id")


@contextmanager
def head_as_identity(head: nn.Linear) -> Iterator[None]:
    """While inside, the head returns its input: the model's `logits` are the final hidden states."""
    vars(head)["forward"] = _identity  # an instance attribute over nn.Linear.forward, as plain_head looks for it
    try:
        yield
    finally:
        del head.forward


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def micro_loss(model: nn.Module, batch: dict[str, Any], path: str = "fused") -> torch.Tensor:
    """Sum over target tokens of -log p(token | prefix) for one micro-batch (a 0-d tensor with grad).

    batch: input_ids [B, T], labels [B, T] aligned with input_ids (-100 = no loss), and attention_mask [B, T]
    (padded rows) or position_ids [B, T] (packed rows; positions restart per example, no KV cache is built);
    optionally `shared_prefix` (an int: the rows' first columns are computed once, shared_prefix.py).
    path: "fused" | "keep" | "full" (`loss_path`); "fused" falls back to "keep" where the head does not allow it.
    """
    labels = batch["labels"]                                  # [B, T]
    targets = labels[:, 1:]                                   # [B, T-1]: the token predicted at position t
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if path == "full":
        logits = model(**inputs, use_cache=False).logits[:, -labels.shape[1]:-1]  # [B, T-1, V]
        return _cross_entropy(logits, targets)
    keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # [K] positions some row needs a logit at
    targets = targets[:, keep]                                # [B, K]
    # Negative indices count from the end, so they stay right if a method prepends virtual tokens.
    head = plain_head(model) if path == "fused" else None
    prefix = batch.get(SHARED_KEY, 0)

    def forward() -> torch.Tensor:  # [B, K, V] logits, or [B, K, H] hidden states while the head is the identity
        if prefix:
            return shared_forward(model, inputs, prefix, logits_to_keep=keep - labels.shape[1]).logits
        return model(**inputs, use_cache=False, logits_to_keep=keep - labels.shape[1]).logits

    if head is None:
        return _cross_entropy(forward(), targets)
    with head_as_identity(head):
        hidden = forward()
    rows = targets != IGNORE_INDEX                            # [B, K]: the exact target positions
    return linear_cross_entropy(hidden[rows], head.weight, head.bias, targets[rows])


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of [B, K, V] logits against [B, K] targets (-100 ignored), in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

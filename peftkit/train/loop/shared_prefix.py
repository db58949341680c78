"""A prompt prefix shared by every row of a micro-batch is computed once, not once per row.

Chat data repeats itself: the template's system prompt, a fixed instruction, few-shot examples. In the bundled
task, 49 of the ~105 tokens of every example are the same ("<|im_start|>system ... date=YYYY-MM-DD\\n\\n"). A plain
forward computes those columns for each of the B rows; here they are computed once, for row 0, with the KV cache
on; the cache is repeated to B rows, and the rest of the batch runs on top of it:

    input_ids [B, T]  ->  prefix  ids[0:1, :P]   forward, use_cache          -> K/V of P positions (1 row)
                          cache repeated to B rows (autograd sums the rows' gradients back into the one prefix)
                          suffix  ids[:, P:]     forward on the cache, positions P..T-1, mask [B, T]

Causal attention makes this exact: no column before P looks at anything after it, so the prefix's keys and
values are the same in every row. The loss and gradients match the plain forward to float rounding (tested per
architecture in fp32). What it saves is (B-1)/B of the prefix's share of the FLOPs: ~40% of a training step of
the bundled task at 8 rows per micro-batch. With dropout (LoRA's lora_dropout, default 0), the prefix's positions
draw one dropout mask for the whole micro-batch instead of one per row: the gradient is still an unbiased
estimate, with rows' noise correlated on those positions.

Where it applies (`sharing_blocker` says why not otherwise): a decoder whose forward takes a cache, position ids and
`logits_to_keep`, of an architecture tested here (ARCHITECTURES); no forward-time method (prefix / prompt tuning
own the cache); no gradient checkpointing (transformers then turns the cache off); no packing (a packed row holds
several examples); no FSDP / DeepSpeed (their hooks expect one forward per backward). Per micro-batch, the shared
part is the longest prefix all rows have in common, cut before the first position that predicts a target (those
need their own logits), and only used when it is at least MIN_SHARED tokens. (speed.should_share_prefix adds the
run's own conditions: an SFT objective, and rows within the model's sliding window.)
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from peftkit.core.labels import IGNORE_INDEX

MIN_SHARED = 16  # a shorter shared prefix saves too little to pay for the extra forward call
# Model types whose loss and gradients were checked equal to the plain forward (tests/train/test_shared_prefix.py).
ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2"})
KEY = "shared_prefix"  # the batch key (an int) collation sets when the rows share a prefix


def sharing_blocker(model: nn.Module, packing: bool, checkpointing: bool, sharded: bool) -> str | None:
    """Why the shared-prefix forward cannot be used for `model` in this run (None: it can)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    params = inspect.signature(model.forward).parameters
    if kind not in ARCHITECTURES:
        return f"not checked for {kind or 'this model'} (checked: {', '.join(sorted(ARCHITECTURES))})"
    if "logits_to_keep" not in params or "position_ids" not in params or cache_kwarg(model) is None:
        return "the model's forward takes no cache, position ids or logits_to_keep"
    if any(hasattr(module, "num_virtual") for module in model.modules()):
        return "a forward-time method (prefix / prompt tuning) owns the KV cache"
    if checkpointing:
        return "gradient checkpointing turns the KV cache off"
    if packing:
        return "packed rows hold several examples each"
    if sharded:
        return "FSDP / DeepSpeed expect one forward per backward"
    return None


def shared_length(input_ids: list[list[int]], labels: list[list[int]]) -> int:
    """Length of the prefix the shared forward may compute once for these (unpadded) rows; 0 when not worth it.

    The longest prefix all rows have in common, cut so that the first position predicting a target (label index j
    is predicted at column j - 1) lies after it, and so that every row keeps at least one column after it.
    """
    n = common_length(input_ids)
    for row in labels:
        target = next((j for j, label in enumerate(row) if label != IGNORE_INDEX), len(row))
        n = min(n, target - 1)
    return n if n >= MIN_SHARED else 0


def common_length(rows: list[list[int]]) -> int:
    """How many first tokens all rows have in common, leaving each row at least one more (0 for a single row)."""
    if len(rows) < 2:
        return 0
    first, n = rows[0], min(len(row) for row in rows) - 1
    for row in rows[1:]:
        n = next((i for i in range(n) if row[i] != first[i]), n)
    return n


def shared_forward(model: nn.Module, inputs: dict[str, torch.Tensor], prefix: int,
                   logits_to_keep: int | torch.Tensor = 0) -> Any:
    """The model's output for columns prefix..T-1 of every row, the first `prefix` columns computed once.

    inputs: input_ids [B, T] and attention_mask [B, T] (right-padded rows whose first `prefix` ids are equal).
    logits_to_keep applies to the suffix (negative indices count from the end, so the same values select the same
    columns as in a plain forward).
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rows, total = ids.shape
    inner = getattr(model, "module", model)  # DDP: one backward still reaches every parameter once
    cache = prefix_cache(inner, ids[:1, :prefix], rows)
    positions = torch.arange(prefix, total, device=ids.device).expand(rows, -1)
    name = cache_kwarg(inner)
    assert name is not None, "shared_forward runs on models that pass sharing_blocker, whose forward takes a cache"
    return model(input_ids=ids[:, prefix:], attention_mask=mask, position_ids=positions, use_cache=True,
                 logits_to_keep=logits_to_keep, **{name: cache})


def prefix_cache(model: nn.Module, prefix_ids: torch.Tensor, rows: int) -> Any:
    """The KV cache of one row's prefix [1, P] (computed with the model's current grad mode), repeated to `rows`."""
    cache = returned_cache(model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1))
    cache.batch_repeat_interleave(rows)
    return cache


def returned_cache(output: Any) -> Any:
    """The KV cache a forward returned (transformers renamed `past_key_values` to `cache`)."""
    return getattr(output, "cache", None) or output.past_key_values


def cache_kwarg(model: nn.Module) -> str | None:
    """The name the model's forward takes a KV cache under (transformers renamed `past_key_values` to `cache`)."""
    params = inspect.signature(getattr(model, "module", model).forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)

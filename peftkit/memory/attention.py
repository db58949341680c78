"""Make HF's SDPA attention take, under fake tensors, the same path it takes on real unpadded batches.

On a real batch with no padding and no cache, transformers sees that the causal mask can be skipped and calls
SDPA with `is_causal=True` (and `enable_gqa=True`, so K/V are not repeated). Under fake tensors it cannot read the
position ids, assumes the batch may be packed, builds a (B, 1, S, S) mask and then repeats K/V per head: memory a
real run never allocates (5 GB on Qwen2.5-72B at seq 2048). We register, through transformers' public
`AttentionInterface` / `AttentionMaskInterface`, an implementation named `peftkit_trace` that is HF's own SDPA
attention with a mask function returning no mask exactly when the real run would have none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

if TYPE_CHECKING:  # a runtime import of PreTrainedModel loads transformers' modeling code (~2.5 s)
    from transformers import PreTrainedModel

NAME = "peftkit_trace"


def _mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
          attention_mask: Any = None, local_size: int | None = None, **kwargs: Any) -> Any:  # fmt: skip
    """No mask when a real unpadded, cache-free batch would get none (SDPA `is_causal`); else HF's SDPA mask."""
    plain = attention_mask is None and q_length == kv_length and not q_offset and not kv_offset
    window_ok = local_size is None or kv_length < local_size
    if plain and window_ok:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, local_size=local_size, **kwargs)  # fmt: skip


AttentionInterface.register(NAME, sdpa_attention_forward)
AttentionMaskInterface.register(NAME, _mask)


@contextlib.contextmanager
def trace_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run `model` with the `peftkit_trace` attention inside the block (only if it uses SDPA), restore after."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    if previous not in (None, "sdpa"):
        yield
        return
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous or "sdpa")

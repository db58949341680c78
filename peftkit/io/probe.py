"""One probe forward after an adapter is loaded for inference: refuse an adapter that breaks the model's output.

The load-time checks (`io.adapters`) refuse NaN and inf in the weights, but a finite weight can still break the
model: huge values (a LoRA lora_B of 1e20) push the residual stream so high that the norm's mean of squares
overflows fp32 (|h| above ~1.8e19) to inf, rsqrt(inf) is 0, the normalized state is exactly 0, and so are all the
logits. Greedy decoding then picks token 0 every step (often a special token, decoded to empty text) and the
command would report success. No magnitude bound on the tensors separates this from a legitimate adapter (the
overflow depends on the base's activations and the method's scaling), so the output is checked instead: the
logits of a few fixed tokens must be finite, and no position may give every token the same score (no working
language model does). Only when the adapted output fails is the base run again without the adapter, so a base
that is itself degenerate (a zero-initialized test model) is not blamed on the adapter. Cost: one forward of 4
tokens per load.
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.core.ops import disable_adapters
from peftkit.errors import PeftkitError
from peftkit.io.finite import describe, is_finite

PROBE_LENGTH = 4


def check_adapted_output(model: nn.Module, adapter: str) -> None:
    """Refuse, in one PeftkitError line naming `adapter`, when the adapted model's logits on a probe input are
    non-finite or give every token the same score while the base model's are fine (see the module docstring)."""
    problem = _output_problem(model)
    if problem is None:
        return
    with disable_adapters(model):
        if _output_problem(model) is not None:
            return  # the base model's output is degenerate too: not the adapter's doing
    raise PeftkitError(f"adapter {adapter!r} breaks the model: on a probe input its logits {problem}, while the "
                       "base model's are fine; its weights are broken (huge values overflow the model's arithmetic; "
                       "did its training diverge?)")


def _output_problem(model: nn.Module) -> str | None:
    """What is wrong with the model's logits on `PROBE_LENGTH` fixed tokens, or None."""
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    vocab = int(embeddings.weight.shape[0])
    ids = (torch.arange(1, PROBE_LENGTH + 1) % vocab).unsqueeze(0).to(embeddings.weight.device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits.float()
    if not is_finite(logits):
        return f"have {describe(logits)}"
    flat = (logits.amax(-1) == logits.amin(-1)).any()
    return "give every token the same score (all next tokens equally likely)" if bool(flat) else None

"""One probe forward after an adapter is loaded for inference: refuse an adapter that breaks the model's output.

The load-time checks (`io.adapters`) refuse NaN and inf in the weights, but a finite weight can still break the
model: huge values (a LoRA lora_B of 1e20) push the residual stream so high that the norm's mean of squares
overflows fp32 (|h| above ~1.8e19) to inf, rsqrt(inf) is 0, the normalized state is exactly 0, and so are all the
logits. Greedy decoding then picks token 0 every step (often a special token, decoded to empty text) and the
command would report success. No magnitude bound on the tensors separates this from a legitimate adapter (the
overflow depends on the base's activations and the method's scaling), so the output is checked instead: the
logits of a few fixed tokens must be finite, and no position may give every token the same score (no working
language model does). Only when the adapted output fails is the base run again without the adapter, so a base
that is itself degenerate (a zero-initialized test model) is not blamed on the adapter.

Weights huge enough to swamp the model but not to overflow (a lora_B of 1e18 on a small model) leave finite,
varied logits, because the final norm rescales whatever reaches it: the answer is garbage, but no output check can
tell. What does tell is the residual stream that reaches the final norm: the adapter multiplies its size by about
the weights' magnitude (a lora_B of 1e6 on a tiny model: 5e6x). Working adapters change it far less: randomly
perturbed adapters of every method on tiny random models, whose own activations are small, by 0.5x to 233x (OFT);
`SCALE_LIMIT` refuses 10,000x or more. Cost: two forwards of 4 tokens per load (with and without the adapter).
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.core.ops import disable_adapters
from peftkit.errors import PeftkitError
from peftkit.io.finite import describe, is_finite

PROBE_LENGTH = 4
SCALE_LIMIT = 1e4  # adapted / base size of the residual stream before the final norm


def check_adapted_output(model: nn.Module, adapter: str) -> None:
    """Refuse, in one PeftkitError line naming `adapter`, when the adapted model's logits on a probe input are
    non-finite or give every token the same score while the base model's are fine, or when the adapter multiplies
    the residual stream's size by `SCALE_LIMIT` or more (see the module docstring)."""
    problem, size = _output_problem(model)
    with disable_adapters(model):
        base_problem, base_size = _output_problem(model)
    if problem is not None and base_problem is None:
        raise PeftkitError(f"adapter {adapter!r} breaks the model: on a probe input its logits {problem}, while the "
                           "base model's are fine; its weights are broken (huge values overflow the model's "
                           "arithmetic; did its training diverge?)")
    if problem is None and base_size > 0 and size / base_size >= SCALE_LIMIT:
        raise PeftkitError(f"adapter {adapter!r} breaks the model: on a probe input it makes the residual stream "
                           f"{size / base_size:.3g}x as large as the base model's (a working fine-tune changes it by "
                           "a small factor); its weights are broken (huge values; did its training diverge?)")


def _output_problem(model: nn.Module) -> tuple[str | None, float]:
    """What is wrong with the model's logits on `PROBE_LENGTH` fixed tokens (or None), and the mean size (L2 norm
    per position) of the residual stream that enters the last layer's successor, the final norm."""
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    vocab = int(embeddings.weight.shape[0])
    ids = (torch.arange(1, PROBE_LENGTH + 1) % vocab).unsqueeze(0).to(embeddings.weight.device)
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
    logits = out.logits.float()
    hidden = out.hidden_states[-2].float() if out.hidden_states else None  # [-1] is after the final norm
    size = float(hidden.norm(dim=-1).mean()) if hidden is not None and is_finite(hidden) else float("inf")
    if not is_finite(logits):
        return f"have {describe(logits)}", size
    flat = (logits.amax(-1) == logits.amin(-1)).any()
    return ("give every token the same score (all next tokens equally likely)" if bool(flat) else None), size

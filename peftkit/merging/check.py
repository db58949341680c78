"""`--check-logits`: load the base with the adapter(s) unmerged and the merged folder, compare logits on a probe.

This loads two full models, so it is for models that fit in memory; the streaming merge's own probe check never
does. The reference is computed by a different path than the merge: peftkit's LoRA forward, W x + s·B(A x).
"""

from __future__ import annotations

import tempfile

import torch

from peftkit.io.adapters import load_adapter
from peftkit.io.checkpoint import resolve_base
from peftkit.merging.deltas import combine, read_lora, write_lora


def check_logits(base: str | None, adapters: list[str], merged: str, weights: list[float], combination: str = "concat",
                 rank: int | None = None, length: int = 16, seed: int = 0) -> float:
    """Max |logit difference| between base + adapters (unmerged, fp32) and the merged model (fp32) on random ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_base(base), dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        if len(adapters) == 1 and weights == [1.0] and combination != "svd":
            load_adapter(model, adapters[0])
        else:
            write_lora(combine([read_lora(a, w) for a, w in zip(adapters, weights, strict=True)], combination, rank), f"{tmp}/combined")
            load_adapter(model, f"{tmp}/combined")
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        del model
        merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        got = merged_model(input_ids=ids).logits
    return float((got - reference).abs().max())

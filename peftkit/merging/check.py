"""`--check-logits`: load the base with the adapter(s) unmerged and the merged folder, compare logits on a probe.
For a QLoRA adapter, also how much the merge base matters (`base_logits_difference`: original vs de-quantized).

This loads two full models, so it is for models that fit in memory; the streaming merge's own probe check never
does. The reference is computed by a different path than the merge: peftkit's LoRA forward, W x + s·B(A x).
"""

from __future__ import annotations

import tempfile

import torch

from peftkit.io.adapters import load_adapter
from peftkit.io.shards import resolve_base
from peftkit.merging.deltas import combine, read_lora, write_lora
from peftkit.merging.quantized import dequantize_model


def check_logits(base: str | None, adapters: list[str], merged: str, weights: list[float], combination: str = "concat",
                 rank: int | None = None, length: int = 16, seed: int = 0, quant: dict | None = None) -> float:
    """Max |logit difference| between base + adapters (unmerged, fp32) and the merged model (fp32) on random ids;
    `quant`: the base the merge used was the de-quantized one (`MergeReport.quantization`)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_base(base), dtype=torch.float32).eval()
    if quant is not None:  # the merge went into the de-quantized base (a QLoRA adapter's)
        dequantize_model(model, quant)
    _load_adapters(model, adapters, weights, combination, rank)
    ids = _probe_ids(model, length, seed)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        del model
        merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        got = merged_model(input_ids=ids).logits
    return float((got - reference).abs().max())


def base_logits_difference(base: str | None, adapters: list[str], weights: list[float], quant: dict,
                           combination: str = "concat", rank: int | None = None, length: int = 8, seed: int = 0) -> float:
    """Max |logit difference| on a probe of `length` random tokens between the adapters over the original base and
    over the de-quantized base (`quant`): how much choosing `--merge-base` matters. One fp32 model at a time."""
    from transformers import AutoModelForCausalLM

    logits = []
    for dequantize in (False, True):
        model = AutoModelForCausalLM.from_pretrained(resolve_base(base), dtype=torch.float32).eval()
        if dequantize:
            dequantize_model(model, quant)
        _load_adapters(model, adapters, weights, combination, rank)
        with torch.no_grad():
            logits.append(model(input_ids=_probe_ids(model, length, seed)).logits)
        del model
    return float((logits[1] - logits[0]).abs().max())


def _load_adapters(model, adapters: list[str], weights: list[float], combination: str, rank: int | None) -> None:
    """Load the adapters unmerged: one as it is, several as their combination (written to a temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        if len(adapters) == 1 and weights == [1.0] and combination != "svd":
            load_adapter(model, adapters[0])
        else:
            write_lora(combine([read_lora(a, w) for a, w in zip(adapters, weights, strict=True)], combination, rank), f"{tmp}/combined")
            load_adapter(model, f"{tmp}/combined")


def _probe_ids(model, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))

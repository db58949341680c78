"""Which base a QLoRA adapter is merged into (`peftkit merge --merge-base quantized|original`).

A QLoRA adapter was trained against W_q = dequantize(quantize(W)), not against W: the LoRA update learned to work
with (and partly to correct) the quantization error. Merging it into the original 16/32-bit weights gives
W + ΔW, a model nobody trained, which can be measurably worse (unsloth-zoo#810, peft#2105, peft#2321); merging
into the de-quantized base gives W_q + ΔW, exactly the model the adapter was trained and evaluated as, stored
densely. So the default base of an adapter whose peftkit.json records a quantization is "quantized": every
weight transformers quantized at training (every linear layer but those it keeps in full precision) is
quantized again the same way (`peftkit.io.quantize.dequantized`, bitsandbytes' own classes) and de-quantized,
adapted or not, and the deltas are added to that. "original" merges into W as for a plain LoRA adapter.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.errors import PeftkitError
from peftkit.io.quantize import dequantized, quantized_module
from peftkit.merging.deltas import LoraDeltas
from peftkit.merging.plan import MergePlan, Target, find_key

MERGE_BASES = ("quantized", "original")


def recorded_quantization(parts: list[LoraDeltas]) -> dict | None:
    """The quantization the adapters were trained over (peftkit.json "quantization"); None when none records one.
    Adapters trained over different quantized bases (or some over a plain one) cannot share one merge base."""
    records = [part.meta.get("quantization") for part in parts]
    if all(r is None for r in records):
        return None
    if any(r != records[0] for r in records[1:]):
        raise PeftkitError("the adapters were trained over different bases (quantized differently, or some not "
                           "quantized); merge them one at a time, or pass --merge-base original")
    return records[0]


def merge_base_quantization(merge_base: str | None, record: dict | None) -> dict | None:
    """The quantization to apply to the base before adding the deltas (None: merge into the original weights).

    merge_base None means "quantized" when the adapters record a quantization, else "original"."""
    if merge_base is not None and merge_base not in MERGE_BASES:
        raise PeftkitError(f"--merge-base must be one of {', '.join(MERGE_BASES)}, got {merge_base!r}")
    if merge_base == "quantized" and record is None:
        raise PeftkitError("--merge-base quantized needs a QLoRA adapter: this adapter's peftkit.json records no "
                           "quantization (it was trained over a plain base); drop --merge-base")
    return None if merge_base == "original" else record


def quantized_layers(model: nn.Module, record: dict) -> list[tuple[str, nn.Linear | Conv1D]]:
    """(path, module) of every linear layer transformers quantizes under `record` (its own skip rule)."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and quantized_module(name, record)]


def dequantize_model(model: nn.Module, record: dict) -> nn.Module:
    """Replace, in place, every weight transformers would quantize under `record` by its de-quantized value: the
    dense equivalent of the base the adapter was trained over (for the probe that compares the merge bases)."""
    for _, module in quantized_layers(model, record):
        w = module.weight.data
        deq = dequantized(w.T, record).T if isinstance(module, Conv1D) else dequantized(w, record)
        module.weight.data = deq.to(w.dtype)
    return model


def add_dequantized(plan: MergePlan, meta: nn.Module, shapes: dict, record: dict) -> None:
    """Mark every weight transformers quantized under `record` to be merged into its de-quantized form: LoRA
    targets get `dequantize = record`, the other quantized weights become targets of their own (no delta)."""
    keys, prefix = set(shapes), getattr(meta, "base_model_prefix", "")
    for name, module in quantized_layers(meta, record):
        key = find_key(f"{name}.weight", keys, prefix)
        if key is None:
            continue
        target = plan.targets.get(key)
        if target is None:
            plan.targets[key] = Target(key=key, source=key, transpose=isinstance(module, Conv1D), dequantize=record)
        elif target.full is None:
            target.dequantize = record

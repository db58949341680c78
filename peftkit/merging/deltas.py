"""LoRA adapters as per-module weight deltas, and weighted combinations of several adapters.

Each adapted module's update is ΔW = s · B A (s = alpha / r, or alpha / √r with rsLoRA). A weighted combination
Σ_i w_i s_i B_i A_i can be represented three ways:
- concat: exactly, as one LoRA of rank Σ r_i: A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...], scale 1.
- linear: the weighted sum of the deltas themselves; merged into weights it equals concat, and as a saved adapter it
  *is* concat (a sum of low-rank products is a concatenation), so `combine` writes it as such.
- svd: the best rank-R approximation of the exact sum (Eckart-Young), computed from the factors by QR (`svd.py`).
Full tensors saved by `modules_to_save` are kept apart (`full`), since they replace a weight rather than add to it.

A DoRA adapter (`use_dora`) also carries a magnitude m per output row: its merged weight is
g ⊙_row (W + ΔW) with g = m / ‖W + ΔW‖_row, which needs the base weight W and is no delta. So it merges alone, at
weight 1 (`stream.py` applies it), and is refused by every combination: the weighted sum of two DoRA adapters is
neither a DoRA adapter nor a LoRA.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from peftkit.core.registry import method_for_peft_type
from peftkit.errors import PeftkitError
from peftkit.io.adapters import read_adapter, write_adapter_folder
from peftkit.io.finite import check_finite, check_weights, is_finite
from peftkit.io.outputs import check_output
from peftkit.merging.svd import low_rank_svd
from peftkit.methods.lora.format import (
    lora_config_from_json,
    lora_tensors,
    one_rank,
    parse_keys,
    saved_module_names,
    scale_one_config,
    target_modules_for,
)
from peftkit.methods.lora.inits import split_factors
from peftkit.methods.lora.saved import split_saved

COMBINATIONS = ("concat", "linear", "svd")


@dataclass
class ModuleDelta:
    """ΔW = B @ A (scales and weights already folded into B), plus a bias delta; fp32, [out, in] convention."""

    a: torch.Tensor  # [r, d_in]
    b: torch.Tensor  # [d_out, r]
    bias: torch.Tensor | None = None  # [d_out]
    magnitude: torch.Tensor | None = None  # DoRA's m [d_out]: the merged weight is m / ‖W + B A‖_row ⊙ (W + B A)

    def dense(self) -> torch.Tensor:
        return self.b @ self.a


@dataclass
class LoraDeltas:
    """Everything one adapter (or a combination) changes: low-rank deltas and full replacement tensors."""

    deltas: dict[str, ModuleDelta]  # module path -> delta
    full: dict[str, list[tuple[float, torch.Tensor]]] = field(default_factory=dict)  # param key -> [(weight, tensor)]
    base_model: str | None = None
    meta: dict = field(default_factory=dict)
    fan_in_fan_out: bool = False  # the targets are GPT-2 Conv1D layers (PEFT records this in the config)
    sources: list[str] = field(default_factory=list)  # the adapter folders these deltas were read from
    target_names: list[str] | None = None  # the sources' target_modules when every one is a list of names


def _explain_not_lora(peft_type: str, path: str) -> PeftkitError:
    """Why an adapter of another type cannot be merged into the weights."""
    try:
        method = method_for_peft_type(peft_type)
        reason = method.why_not_mergeable or "peftkit merges LoRA adapters shard by shard only"
    except PeftkitError:
        reason = "peftkit does not know this adapter type"
    return PeftkitError(
        f"adapter {path!r} is {peft_type}, not LoRA: {reason} It changes the computation, not the weights, so there "
        "is no weight delta to merge; load it at inference with --adapter instead"
    )


def read_lora(path: str | os.PathLike, weight: float = 1.0) -> LoraDeltas:
    """Read a saved LoRA adapter (peftkit, HF PEFT, mergekit) as fp32 deltas, `weight` folded in.

    Every tensor of the file is finite (`read_adapter` checks), and so must be its product with `weight` and the
    LoRA scale.
    """
    check_weights([weight])
    config_json, tensors, meta = read_adapter(path)
    peft_type = config_json.get("peft_type")
    if peft_type != "LORA":
        raise _explain_not_lora(str(peft_type), str(path))
    if any(".lora_embedding_" in k for k in tensors):
        raise PeftkitError(f"adapter {str(path)!r} has LoRA on embeddings, which peftkit cannot merge")
    saved, lora_tensors = split_saved(tensors, saved_module_names(config_json))
    full = {f"{module}.{param}": v.float() for module, state in saved.items() for param, v in state.items()}
    keys = parse_keys(lora_tensors)
    config = lora_config_from_json(config_json, keys, where=f"adapter {str(path)!r}")
    if config.use_dora and weight != 1.0:
        raise PeftkitError(f"adapter {str(path)!r} is DoRA, whose merged weight m / ‖W + ΔW‖ ⊙ (W + ΔW) does not scale "
                           f"with a weight; give it weight 1 (got {weight:g})")
    deltas: dict[str, ModuleDelta] = {}
    for module, slots in keys.items():
        if "A" not in slots or "B" not in slots:
            raise PeftkitError(f"adapter {str(path)!r} has only one of lora_A / lora_B for module {module!r}")
        a, b = lora_tensors[slots["A"]].float(), lora_tensors[slots["B"]].float()
        r, alpha = config.rank_alpha(module)
        if a.shape[0] != r or b.shape[1] != r:
            raise PeftkitError(f"adapter {str(path)!r}: module {module!r} has rank {a.shape[0]} but its config says r={r}")
        lora_scale = alpha / r**0.5 if config.use_rslora else alpha / r
        scale = weight * lora_scale
        bias = lora_tensors[slots["bias"]].float() * scale if "bias" in slots else None
        magnitude = lora_tensors[slots["m"]].float() if "m" in slots else None
        delta = ModuleDelta(a=a, b=b * scale, bias=bias, magnitude=magnitude)
        for name, part in (("lora_B", delta.b), ("lora_B.bias", bias)):
            if part is not None and not is_finite(part):
                raise PeftkitError(f"adapter {str(path)!r}: {name} of module {module!r} times its weight {weight:g} "
                                   f"and scale {lora_scale:g} overflows float32; give smaller --weights")
        deltas[module] = delta
    targets = config_json.get("target_modules")
    names = list(targets) if isinstance(targets, list) and all(isinstance(t, str) for t in targets) else None
    return LoraDeltas(deltas, {k: [(weight, v)] for k, v in full.items()}, config_json.get("base_model_name_or_path"),
                      meta, bool(config_json.get("fan_in_fan_out", False)), [str(path)], names)


def combine(parts: list[LoraDeltas], how: str = "concat", rank: int | None = None) -> LoraDeltas:
    """One LoraDeltas for the weighted sum of `parts` (weights already folded in by `read_lora`)."""
    if how not in COMBINATIONS:
        raise PeftkitError(f"unknown combination {how!r}; choose one of {', '.join(COMBINATIONS)}")
    if how == "svd" and (rank is None or rank <= 0):
        raise PeftkitError("--combination svd needs a positive --rank (the rank of the combined adapter)")
    if any(d.magnitude is not None for p in parts for d in p.deltas.values()) and (len(parts) > 1 or how == "svd"):
        dora = next(p for p in parts if any(d.magnitude is not None for d in p.deltas.values()))
        raise PeftkitError(f"adapter {dora.sources[0]!r} is DoRA: it rescales each row of W + ΔW by its own magnitude, "
                           f"so {how} with {'other adapters' if len(parts) > 1 else 'a rank'} is not a DoRA adapter nor "
                           "a LoRA; merge it alone into the base (`peftkit merge --adapter A`), then merge the others "
                           "into that")
    if len(parts) == 1 and how != "svd":
        return parts[0]
    modules = list(dict.fromkeys(m for p in parts for m in p.deltas))
    deltas = {}
    for module in modules:
        pieces = [p.deltas[module] for p in parts if module in p.deltas]
        _check_same_shape(module, [(p, p.deltas[module]) for p in parts if module in p.deltas])
        delta = ModuleDelta(torch.cat([d.a for d in pieces], 0), torch.cat([d.b for d in pieces], 1))
        biases = [d.bias for d in pieces if d.bias is not None]
        delta.bias = torch.stack(biases).sum(0) if biases else None
        if how == "svd" and rank is not None:  # (always set for svd: checked above)
            delta = _svd_delta(module, delta, rank)
        deltas[module] = delta
    full: dict[str, list[tuple[float, torch.Tensor]]] = {}
    for part in parts:
        for key, entries in part.full.items():
            full.setdefault(key, []).extend(entries)
    names = None if any(p.target_names is None for p in parts) else sorted({n for p in parts for n in p.target_names or ()})
    meta = dict(parts[0].meta)
    if any(p.meta.get("quantization") != meta.get("quantization") for p in parts):  # no one base they all trained over
        meta.pop("quantization", None)
    return LoraDeltas(deltas, full, parts[0].base_model, meta, any(p.fan_in_fan_out for p in parts),
                      [s for p in parts for s in p.sources], names)


def _check_same_shape(module: str, pieces: list[tuple[LoraDeltas, ModuleDelta]]) -> None:
    """Adapters combined on one module must update a weight of one shape (out x in): else they were trained on
    different bases (another hidden size), and no sum of them fits either."""
    shapes = [(p, (d.b.shape[0], d.a.shape[1])) for p, d in pieces]
    first, want = shapes[0]
    for part, shape in shapes[1:]:
        if shape != want:
            raise PeftkitError(f"the adapters do not fit one base: module {module!r} is {want[0]}x{want[1]} in "
                               f"{first.sources[0]} but {shape[0]}x{shape[1]} in {part.sources[0]}; combine or merge "
                               "adapters trained on the same base model")


def _svd_delta(module: str, delta: ModuleDelta, rank: int) -> ModuleDelta:
    """The rank-`rank` SVD truncation of one combined delta; a failed or non-finite decomposition names the module."""
    try:
        a, b = split_factors(*low_rank_svd(delta.b, delta.a, rank))
    except torch.linalg.LinAlgError as exc:
        raise PeftkitError(f"the SVD of the combined delta of module {module!r} failed ({' '.join(str(exc).split())}); "
                           "are the adapters' values or --weights extreme?") from None
    for name, factor in (("A", a), ("B", b)):
        check_finite(factor, f"the SVD of the combined delta of module {module!r}: factor {name}")
    return ModuleDelta(a, b, delta.bias)


def parse_weights(text: str | None, count: int) -> list[float]:
    """--weights "0.7,0.3" -> [0.7, 0.3]; default 1 for every adapter."""
    if text is None:
        return [1.0] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise PeftkitError(f"--weights must be comma-separated numbers, got {text!r}") from None
    for item, weight in zip(text.split(","), weights, strict=True):
        if not math.isfinite(weight):
            raise PeftkitError(f"--weights must be finite numbers, got {item.strip()!r} in {text!r}")
    if len(weights) != count:
        raise PeftkitError(f"--weights has {len(weights)} values for {count} adapters; give one per --adapter")
    return weights


def write_lora(deltas: LoraDeltas, path: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Save combined deltas as a PEFT LoRA adapter: every module at one rank (zero-padded, `format.one_rank`) with
    scale 1 and no rank / alpha patterns, so HF PEFT, vLLM and llama.cpp apply the same deltas."""
    if deltas.full:
        raise PeftkitError("the adapters carry full modules (modules_to_save), which cannot be combined without "
                           "the base weights; merge them into the base with `peftkit merge` instead")
    check_output(path, overwrite, inputs=deltas.sources)
    with_bias = any(d.bias is not None for d in deltas.deltas.values())
    factors, rank = one_rank({m: (d.a, d.b, d.bias) for m, d in deltas.deltas.items()})
    targets = target_modules_for(list(factors), names=deltas.target_names)
    config = scale_one_config(rank, targets, base_model=deltas.base_model, lora_bias=with_bias,
                              fan_in_fan_out=deltas.fan_in_fan_out)
    meta = {"method": "lora", **{k: v for k, v in deltas.meta.items() if k in ("prompt_format", "quantization")}}
    tensors = lora_tensors(factors, with_bias)
    for key, tensor in tensors.items():
        check_finite(tensor, f"tensor {key!r} of the combined adapter")
    write_adapter_folder(path, config, tensors, meta, command="combine")
    return config

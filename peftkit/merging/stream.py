"""Streaming merge: base checkpoint + LoRA adapter(s) -> a new checkpoint, one tensor in memory at a time.

    W' = round_to_dtype( float32(W) + Σ_i w_i s_i B_i A_i )          (transposed for GPT-2's Conv1D [in, out])
    W' = round_to_dtype( m / ‖V‖_row ⊙ V ),  V = float32(W) + s B A   (one DoRA adapter, alone: `deltas.py`)

Each shard of the base is read memory-mapped tensor by tensor; each output shard is declared up front and written
tensor by tensor (`peftkit.io.shards.ShardWriter`), so peak memory is about one tensor plus the adapter, whatever the model
size. Deltas are computed in fp32 and rounded once; each tensor is checked finite after that rounding, before it is
written (`finite.py`: NaN weights or adapters, or a value beyond the output dtype's range, are refused by name).
Config, tokenizer and generation config are copied, the config completed (`architectures`, the dtype written:
`peftkit.io.model_config.complete_config`); the result loads with `AutoModelForCausalLM.from_pretrained`, llama.cpp and vLLM.
The folder appears only when everything is written and checked (`atomic_dir`).

Self-check (bounded memory too): for every changed tensor a random probe x is drawn, y_ref = W x + B (A x) is
computed from the *inputs* in fp32, and after the shard is written the tensor is read back from the output and
‖W' x − y_ref‖ / ‖y_ref‖ is compared with the rounding tolerance of the output dtype. The in-memory
`peftkit.merge(model)` (core/ops.py) remains for users who already hold the model.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from peftkit.errors import PeftkitError
from peftkit.io.finite import cast_checked, check_weights
from peftkit.io.fs import atomic_dir
from peftkit.io.model_config import complete_config
from peftkit.io.models import resolve_dtype
from peftkit.io.outputs import check_output
from peftkit.io.quantize import dequantized
from peftkit.io.shards import (
    SINGLE_NAME,
    TORCH_DTYPES,
    ShardWriter,
    copy_aux_files,
    iter_tensors,
    open_checkpoint,
    resolve_base,
    shapes,
    write_index,
)
from peftkit.merging.deltas import LoraDeltas, combine, parse_weights, read_lora
from peftkit.merging.plan import MergePlan, Target, plan_merge
from peftkit.merging.quantized import add_dequantized, merge_base_quantization, recorded_quantization


@dataclass
class MergeReport:
    """What `merge_to_disk` did, for the CLI and tests."""

    output: str
    base_folder: str
    changed: int = 0  # tensors changed (weights, biases, replacements)
    worst_relative_error: float = 0.0  # self-check, worst over changed tensors
    worst_tensor: str | None = None
    tolerance: float = 1.0  # the output dtype's tolerance for worst_tensor
    untied_lm_head: bool = False
    shards: int = 0
    bytes_written: int = 0
    copied: list[str] = field(default_factory=list)
    seconds: float = 0.0
    logits_max_abs_diff: float | None = None
    merge_base: str = "original"  # "quantized": into the de-quantized base a QLoRA adapter was trained over
    quantization: dict | None = None  # the quantization the adapters recorded (peftkit.json "quantization")
    base_logits_diff: float | None = None  # max |logit difference| between the two merge bases on a probe


def tolerance(dtype: torch.dtype) -> float:
    """Accepted relative probe error: two roundings' worth of the dtype's epsilon, at least 1e-5."""
    return max(2 * torch.finfo(dtype).eps, 1e-5)


def merge_to_disk(base: str | None, adapters: list[str], output: str, *, weights: str | list[float] | None = None,
                  combination: str = "concat", rank: int | None = None, dtype: str | None = None,
                  overwrite: bool = False, seed: int = 0, merge_base: str | None = None) -> MergeReport:
    """Merge LoRA `adapters` (weighted, combined by `combination`) into `base`, writing a model folder at `output`.

    merge_base: "quantized" (the default for QLoRA adapters: into the de-quantized base they were trained over)
    or "original" (see `peftkit.merging.quantized`)."""
    start = time.perf_counter()
    if not adapters:
        raise PeftkitError("give at least one --adapter to merge")
    out_dtype = resolve_dtype(dtype)
    folder = resolve_base(base)
    check_output(output, overwrite, inputs=[folder, *adapters])
    ckpt = open_checkpoint(folder)
    weight_list = check_weights(weights) if isinstance(weights, list) else parse_weights(weights, len(adapters))
    parts = [read_lora(a, w) for a, w in zip(adapters, weight_list, strict=True)]
    recorded = recorded_quantization(parts)
    quant = merge_base_quantization(merge_base, recorded)
    deltas = combine(parts, combination, rank)
    from transformers import AutoConfig

    from peftkit.core.counting import meta_model

    config = AutoConfig.from_pretrained(folder)
    header = shapes(ckpt)
    meta = meta_model(config)
    plan = plan_merge(deltas, meta, header)
    if quant is not None:
        add_dequantized(plan, meta, header, quant)
    report = MergeReport(output=str(output), base_folder=str(folder), untied_lm_head=plan.untie,
                         merge_base="quantized" if quant is not None else "original", quantization=recorded)
    with atomic_dir(output, command="merge") as tmp:
        weight_map: dict[str, str] = {}
        for shard in ckpt.shards:
            layout = _layout(ckpt.keys_of(shard), header, plan, out_dtype)
            probes = _write_shard(ckpt, shard, tmp / shard, layout, plan, deltas, seed)
            report.bytes_written += (tmp / shard).stat().st_size
            _verify(tmp / shard, probes, report)
            weight_map.update(dict.fromkeys(layout, shard))
        if ckpt.shards != [SINGLE_NAME]:
            write_index(tmp, weight_map, report.bytes_written)
        report.copied = copy_aux_files(folder, tmp)
        _fix_config(tmp, plan, _written_dtype(header, out_dtype))
        report.shards = len(ckpt.shards)
        if not report.worst_relative_error <= report.tolerance:  # NaN fails too
            raise PeftkitError(f"self-check failed: {report.worst_tensor} differs from W + s·B·A by "
                               f"{report.worst_relative_error:.2e} (tolerance {report.tolerance:.0e}); nothing written")
    report.seconds = time.perf_counter() - start
    return report


def _layout(keys: list[str], header: dict, plan: MergePlan, out_dtype: torch.dtype | None) -> dict:
    """{output key: (shape, dtype)} of one output shard, with an untied lm_head placed after its source."""
    layout = {}
    for key in keys:
        layout[key] = _out_spec(header[key], out_dtype)
        for new, after in plan.added.items():
            if after == key:
                layout[new] = _out_spec(header[key], out_dtype)
    return layout


def _out_spec(spec: tuple, out_dtype: torch.dtype | None) -> tuple:
    shape, st_dtype = spec
    dtype = TORCH_DTYPES[st_dtype]
    return tuple(shape), (out_dtype if out_dtype is not None and dtype.is_floating_point else dtype)


def _write_shard(ckpt, shard: str, path: Path, layout: dict, plan: MergePlan, deltas: LoraDeltas, seed: int) -> dict:
    """Write one output shard; returns {key: (probe x or None, expected)} for the self-check.

    Every tensor is checked finite after its cast to the output dtype before it is written. On any error (a
    non-finite tensor, Ctrl-C, a full disk) the file is only closed, so that error surfaces: `ShardWriter.close()`
    would raise its own "closed after k of N tensors" in its place.
    """
    writer = ShardWriter(path, layout)
    probes = {}
    try:
        for key, tensor in iter_tensors(ckpt, shard):
            for out_key in [key, *[n for n, a in plan.added.items() if a == key]]:
                target = plan.targets.get(out_key)
                dtype = layout[out_key][1]
                if target is None:
                    writer.write(out_key, cast_checked(tensor, dtype, f"base tensor {out_key!r}", "nothing was written"))
                    continue
                merged, probes[out_key] = _apply(target, tensor, deltas, seed)
                writer.write(out_key, cast_checked(merged, dtype, f"merged tensor {out_key!r}",
                                                   "check --weights and the adapters; nothing was written"))
    except BaseException:
        with contextlib.suppress(OSError):  # e.g. ENOSPC again while flushing: the first error is the one to show
            writer.file.close()
        raise
    writer.close()
    return probes


def _apply(target: Target, tensor: torch.Tensor, deltas: LoraDeltas, seed: int) -> tuple[torch.Tensor, tuple]:
    """(merged fp32 tensor, probe) for one target. The probe's expectation never uses the dense merged tensor.
    A `dequantize` target starts from the de-quantized weight (transformers quantizes Conv1D's [in, out] as [out, in])."""
    w = tensor.float()
    if target.dequantize is not None:
        w = dequantized(w.T, target.dequantize).T if target.transpose else dequantized(w, target.dequantize)
    if target.module is not None:
        d = deltas.deltas[target.module]
        x = _probe(d.a.shape[1], target.key, seed)
        base_w = w.T if target.transpose else w  # [out, in]
        expected = base_w @ x + d.b @ (d.a @ x)
        merged = base_w + d.dense()
        if d.magnitude is not None:  # DoRA: rows rescaled by g = m / ‖W + B A‖_row
            g = d.magnitude / torch.linalg.vector_norm(merged, dim=1)
            merged, expected = merged * g[:, None], expected * g
        return (merged.T if target.transpose else merged), (x, expected, target.transpose)
    if target.bias_of is not None:
        bias = deltas.deltas[target.bias_of].bias
        assert bias is not None  # plan_merge makes bias targets of deltas that have a bias only
        merged = w + bias
        return merged, (None, merged.clone(), False)
    merged = w.clone()
    # W + Σ w_i (F_i − W): a single adapter at weight 1 gives F; no entry: a quantized weight no adapter touches
    for weight, full in deltas.full.get(target.full, []) if target.full is not None else []:
        merged += weight * (full - w)
    if merged.dim() != 2:
        return merged, (None, merged.clone(), False)
    x = _probe(merged.shape[1], target.key, seed)
    return merged, (x, merged @ x, False)


def _probe(n: int, key: str, seed: int) -> torch.Tensor:
    """A reproducible random probe vector for tensor `key` (crc32, not hash(): that changes per process)."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode())))


def _verify(path: Path, probes: dict, report: MergeReport) -> None:
    """Read each changed tensor back from the written shard; keep the worst probe error relative to its tolerance."""
    for key, (x, expected, transpose) in probes.items():  # one mapping per tensor, as in peftkit.io.shards.iter_tensors
        report.changed += 1
        with safe_open(str(path), framework="pt") as f:
            stored = f.get_tensor(key)
        got = stored.float()
        if x is not None:
            got = (got.T if transpose else got) @ x
        err = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
        tol = tolerance(stored.dtype)
        if report.worst_tensor is None or _badness(err, tol) > _badness(report.worst_relative_error, report.tolerance):
            report.worst_relative_error, report.worst_tensor, report.tolerance = err, key, tol


def _badness(err: float, tol: float) -> float:
    """Probe error in units of its tolerance, NaN ranked worst of all (a NaN compares False with everything)."""
    return math.inf if math.isnan(err) else err / tol


def _written_dtype(header: dict, out_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype the merged weights are stored in: `out_dtype`, else the base's floating dtype holding the most
    elements (None when the base has no floating tensor)."""
    if out_dtype is not None:
        return out_dtype
    sizes: dict[torch.dtype, int] = {}
    for shape, st_dtype in header.values():
        dtype = TORCH_DTYPES[st_dtype]
        if dtype.is_floating_point:
            sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
    return max(sizes, key=sizes.__getitem__) if sizes else None


def _fix_config(folder: Path, plan: MergePlan, dtype: torch.dtype | None) -> None:
    """Break the embedding tie when lm_head got its own tensor; complete the copied config: `architectures` (the
    base's, else the class of its model_type) and the dtype the weights were written in."""
    path = folder / "config.json"
    if plan.untie:
        config = json.loads(path.read_text())
        config["tie_word_embeddings"] = False
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    complete_config(folder, dtype=dtype)

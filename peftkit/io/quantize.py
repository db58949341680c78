"""Quantized bases through bitsandbytes (QLoRA): what `load_model(..., quantize=...)` asks transformers for, what an
adapter records about the base it was trained over, and the same quantization applied to one weight offline.

    quantize   "nf4" | "fp4"   4-bit (Dettmers et al. 2023, arXiv:2305.14314): blocks of 64 weights, each scaled by
                               its absmax; NF4's 16 levels are normal quantiles. double_quant also quantizes the
                               per-block scales (8-bit, blocks of 256): ~0.37 bits less per weight.
               "int8"          LLM.int8(): per-row absmax int8 (no outlier decomposition, threshold 0 unless set).

The base is quantized by transformers at load (`BitsAndBytesConfig`): every linear layer becomes a bitsandbytes
`Linear4bit` / `Linear8bitLt` except those transformers keeps in full precision (the output embedding and weights
tied to it: `modules_to_not_convert`). Other weights (embeddings, norms) load in the `dtype` asked for; the 4-bit
layers de-quantize to `compute_dtype` for each matmul.

`quantization_record(model)` is what an adapter's peftkit.json keeps under "quantization", and `dequantized(weight,
record)` reproduces, from an original weight, the de-quantized weight the adapter was trained against (the same
bitsandbytes classes transformers loads through, so the same bits): the default base of `peftkit merge`.
"""

from __future__ import annotations

import os
from typing import Any, overload

import torch

from peftkit.errors import PeftkitError

QUANTIZE = ("nf4", "fp4", "int8")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@overload
def check_quantize(quantize: str) -> str: ...
@overload
def check_quantize(quantize: None) -> None: ...
@overload
def check_quantize(quantize: str | None) -> str | None: ...
def check_quantize(quantize: str | None) -> str | None:
    """`quantize` lower-cased, or None; an unknown value is an error listing the valid ones."""
    if quantize is None:
        return None
    if not isinstance(quantize, str) or quantize.lower() not in QUANTIZE:
        raise PeftkitError(f"unknown quantization {quantize!r}; use one of {', '.join(QUANTIZE)} (or none)")
    return quantize.lower()


def require_bitsandbytes() -> None:
    """Raise a one-line install hint when bitsandbytes (>= 0.48: CPU support) is missing."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise PeftkitError("a quantized base (qlora, quantize=...) needs bitsandbytes >= 0.48: pip install 'peftkit[qlora]'")


def fsdp_requested() -> bool:
    """Whether this process runs under FSDP as accelerate announces it (`accelerate launch --use_fsdp`, or a trainer
    that sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def bnb_config(quantize: str, double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
               fsdp: bool = False) -> Any:
    """transformers' `BitsAndBytesConfig` for `quantize` ("nf4" | "fp4" | "int8").

    fsdp: FSDP shards parameters of one dtype only, so the 4-bit weights are stored in `compute_dtype`
    (`bnb_4bit_quant_storage`, the bitsandbytes FSDP-QLoRA setup); it needs CUDA, and is refused on a CPU.
    """
    from transformers import BitsAndBytesConfig

    quantize = check_quantize(quantize)
    require_bitsandbytes()
    if fsdp and not torch.cuda.is_available():
        raise PeftkitError("QLoRA under FSDP needs CUDA GPUs (bitsandbytes' 4-bit weights stored as "
                           "bnb_4bit_quant_storage, see docs/training.md); on a CPU train without --fsdp")
    if fsdp and quantize == "int8":
        raise PeftkitError("FSDP cannot shard 8-bit bitsandbytes weights; use 4-bit (nf4) with --fsdp")
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_storage=compute_dtype if fsdp else torch.uint8)


def keep_trainable_layout(model: Any) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights (every `Linear4bit`).

    On a CPU with AVX512-BF16, bitsandbytes (0.48 to 0.50 at least) repacks a 4-bit weight, in place, the first time
    the layer runs in eval mode without grad, for a faster inference kernel. That layout has no backward: every
    training step after the first evaluation gets no gradients, silently (torch only warns that gemv_4bit has no
    autograd kernel), and it needs input widths divisible by 64. A model that trains and evaluates in turn must
    keep the trainable layout, so peftkit never lets the repacking happen.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantization_record(model: Any) -> dict | None:
    """What an adapter trained over `model` records about its quantized base (None for a plain base):
    bits, quant_type, double_quant, compute_dtype, the dtype the other weights were loaded in, the block size, and
    the modules transformers left unquantized."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None or not (getattr(qc, "load_in_4bit", False) or getattr(qc, "load_in_8bit", False)):
        return None
    quantizer = getattr(model, "hf_quantizer", None)
    skipped = sorted(getattr(quantizer, "modules_to_not_convert", None) or [])
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    record: dict[str, Any] = {"method": "bitsandbytes", "bits": 4 if qc.load_in_4bit else 8,
                              "dtype": _DTYPE_NAMES.get(dtype, str(dtype)), "modules_not_quantized": skipped}
    if qc.load_in_4bit:
        compute = qc.bnb_4bit_compute_dtype or torch.float32
        record.update(quant_type=qc.bnb_4bit_quant_type, double_quant=bool(qc.bnb_4bit_use_double_quant),
                      compute_dtype=_DTYPE_NAMES.get(compute, str(compute)), blocksize=_blocksize(model))
    return record


def _blocksize(model: Any) -> int:
    """The 4-bit block size of the first quantized weight (bitsandbytes' default is 64)."""
    for param in model.parameters():
        if type(param).__name__ == "Params4bit":
            return int(param.blocksize)
    return 64


def dequantized(weight: torch.Tensor, record: dict) -> torch.Tensor:
    """The fp32 weight a layer quantized as `record` says computes with: `weight` (shape [out, in]) cast to the
    dtype it was loaded in, quantized by bitsandbytes exactly as at load, and de-quantized."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    require_bitsandbytes()
    w = weight.to(getattr(torch, record.get("dtype", "float32"))).contiguous()
    # bitsandbytes types `Int8Params.to` / `Params4bit.to` with a self TypeVar bound to nn.Module, but they are
    # Parameters (tensors): mypy refuses the self argument, hence the two ignores
    if record["bits"] == 8:
        int8 = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to("cpu")  # type: ignore[misc]
        return F.int8_vectorwise_dequant(int8.CB, int8.SCB).float()
    four_bit = bnb.nn.Params4bit(w, requires_grad=False, quant_type=record["quant_type"],
                                 compress_statistics=record["double_quant"], blocksize=record.get("blocksize", 64)).to("cpu")  # type: ignore[misc]
    return F.dequantize_4bit(four_bit.data, four_bit.quant_state).float()


def quantized_module(name: str, record: dict) -> bool:
    """Whether transformers quantized the linear module `name` under `record` (its own skip rule)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    return should_convert_module(name, record.get("modules_not_quantized") or None)


_RECORD_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def load_options(record: Any, where: str) -> dict[str, Any]:
    """The `load_model` arguments that load a base quantized as `record` (a peftkit.json "quantization", see
    `quantization_record`) says: quantize, double_quant, compute_dtype and the dtype of the other weights. A record
    that does not say one of them in a form peftkit writes is a one-line PeftkitError naming `where`."""
    bits = record.get("bits") if isinstance(record, dict) else None
    mode = record.get("quant_type") if bits == 4 else "int8" if bits == 8 else None
    dtypes = [record.get(key, "float32") for key in ("dtype", "compute_dtype")] if isinstance(record, dict) else []
    if mode not in QUANTIZE or any(name not in _RECORD_DTYPES for name in dtypes):
        raise PeftkitError(f"{where}: the recorded quantization {record!r} is not one peftkit writes (bits 4 with "
                           "quant_type nf4 / fp4, or bits 8; dtypes float32 / bfloat16 / float16)")
    options: dict[str, Any] = {"quantize": mode, "dtype": _RECORD_DTYPES[dtypes[0]]}
    if bits == 4:
        options.update(double_quant=bool(record.get("double_quant", True)), compute_dtype=_RECORD_DTYPES[dtypes[1]])
    return options

"""LoftQ (Li et al. 2023, arXiv:2310.08659): `--method qlora --init loftq`, the adapter initialised so that the
quantized base plus the adapter approximates the full-precision weights, instead of starting at the quantized base.

    Q_1 = quant(W),  s·B_t A_t = SVD_r(W - Q_t),  Q_{t+1} = quant(W - s·B_t A_t)        t = 1..T (loftq_iter = T)

A qlora base is quantized at load, so it holds Q_1 = quant(W); an adapter file can only be saved against that base,
so the trainer uses T = 1, which is HF PEFT's `replace_lora_weights_loftq`: A, B are the rank-r SVD of the
quantization error W - Q_1, with W the full-precision weight read from the base model's own safetensors files
(`InitData.weight`). The saved adapter is then a plain LoRA over the quantized base, loaded by PEFT over the same
bitsandbytes base as any qlora adapter. (T > 1 changes the quantized weights themselves; PEFT's `LoftQConfig`
route writes that base to disk as a new model. `loftq` below runs the whole alternation, for measuring what more
iterations would give, docs/methods.md.) Unlike PEFT, which sets B A to the SVD part, peftkit folds LoRA's
scaling in (s·B A = the SVD part), so the init is right for every alpha; with alpha = r the two agree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftkit.core.inject import base_modules
from peftkit.errors import PeftkitError
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.inits import split_factors
from peftkit.methods.lora.layer import LoraLayer

log = logging.getLogger(__name__)


def loftq_factors(w: torch.Tensor, q: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with scale·B A the best rank-r approximation of the error W - Q (fp32, [out, in])."""
    u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
    return split_factors(u[:, :r], s[:r], vh[:r], scale)


def loftq(w: torch.Tensor, r: int, scale: float, quantize: Callable[[torch.Tensor], torch.Tensor],
          iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q_T, A_T, B_T) after `iters` alternations; quantize(x) -> the de-quantized quant(x) (fp32, [out, in])."""
    q = quantize(w)
    a, b = loftq_factors(w, q, r, scale)
    for _ in range(iters - 1):
        q = quantize(w - scale * (b @ a))
        a, b = loftq_factors(w, q, r, scale)
    return q, a, b


def initialise_loftq(model: nn.Module, config: LoraConfig, adapter_name: str,
                     weight: Callable[[str], torch.Tensor]) -> None:
    """Set A, B of every 4-bit layer of adapter `adapter_name` from its quantization error (T = 1, see above)."""
    import bitsandbytes.functional as bnb_functional

    layers = [(p, m) for p, m in base_modules(model) if isinstance(m, LoraLayer) and adapter_name in m.lora_A]
    for path, layer in layers:
        quantized: Any = layer.weight  # bitsandbytes' Params4bit (its quant_state is not in torch's Tensor type)
        if type(quantized).__name__ != "Params4bit":
            raise PeftkitError(f"loftq: module {path!r} is not quantized to 4 bits ({type(quantized).__name__}); "
                               "loftq needs a 4-bit base (--method qlora, bits 4)")
        q = bnb_functional.dequantize_4bit(quantized.data, quantized.quant_state).float()
        w = weight(path).to(q.device, torch.float32)
        if w.shape != q.shape:
            raise PeftkitError(f"loftq: the stored weight of {path!r} is {tuple(w.shape)}, the model's {tuple(q.shape)}")
        a, b = loftq_factors(w, q, layer.factor_a(adapter_name).weight.shape[0], layer.scaling[adapter_name])
        with torch.no_grad():
            layer.factor_a(adapter_name).weight.copy_(a)
            layer.factor_b(adapter_name).weight.copy_(b)
    log.info("loftq: %d quantized modules start at their full-precision weights' rank-%d correction", len(layers),
             config.r)

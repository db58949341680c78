"""LoHa: the weight update as the Hadamard (element-wise) product of two rank-r products (LyCORIS; FedPara, Hyeon-Woo
et al. 2022, arXiv:2108.06098), as HF PEFT 0.21.2's LoHaConfig defines it (`--method loha`).

    ΔW = (alpha / r) * (W1_a W1_b) ⊙ (W2_a W2_b)       W*_a: [out, r], W*_b: [r, in]

The element-wise product of two rank-r matrices can reach rank r², for 2r (out + in) parameters per adapted linear
(twice LoRA's at the same r). Init (`init_weights`): true: W2_b zeros, the others Kaiming-uniform, so the model
starts as its base; false: all random. Rank dropout always rescales the kept rows (PEFT has no switch for LoHa).
The product is one autograd function (`hadamard`) that saves only the four factors and recomputes W1_a W1_b and
W2_a W2_b in backward, as LyCORIS does, instead of keeping two weight-sized products per linear for backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.registry import register
from peftkit.methods.lycoris import DeltaLayer, DeltaMethod, LycorisConfig, kaiming

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass(frozen=True)
class LohaConfig(LycorisConfig):
    """LoHa's options, named and defaulted as in PEFT's LoHaConfig: exactly the shared `LycorisConfig` fields."""


class _Hadamard(torch.autograd.Function):
    """(A1 B1) ⊙ (A2 B2), saving only A1, B1, A2, B2 for backward (the products are recomputed there)."""

    @staticmethod
    def forward(ctx: Any, a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a1, b1, a2, b2)
        return (a1 @ b1) * (a2 @ b2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a1, b1, a2, b2 = ctx.saved_tensors
        grad = grad.to(a1.dtype)
        g1 = grad * (a2 @ b2)  # the gradient reaching A1 B1
        g2 = grad * (a1 @ b1)
        return g1 @ b1.T, a1.T @ g1, g2 @ b2.T, a2.T @ g2


def hadamard(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """(a1 @ b1) * (a2 @ b2) with the memory-saving backward of `_Hadamard`."""
    return _Hadamard.apply(a1, b1, a2, b2)


class LohaLayer(DeltaLayer):
    """A linear layer with LoHa adapters: the factors in `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`."""

    rank_dropout_scale_fixed = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in FACTORS:
            setattr(self, attr, nn.ParameterDict())

    def add_factors(self, name: str, config: LohaConfig, r: int, device: torch.device, dtype: torch.dtype) -> None:
        for attr in FACTORS:
            size = (self.out_features, r) if attr.endswith("_a") else (r, self.in_features)
            getattr(self, attr)[name] = nn.Parameter(torch.empty(size, device=device, dtype=dtype))
        if device.type == "meta":
            return
        with torch.no_grad():
            for attr in FACTORS:
                kaiming(self.factor(attr, name, fp32=False))
            if config.init_weights:
                nn.init.zeros_(self.factor("hada_w2_b", name, fp32=False))

    def unscaled_delta(self, name: str, fp32: bool = False) -> torch.Tensor:
        """(W1_a W1_b) ⊙ (W2_a W2_b), [out, in]."""
        return hadamard(*(self.factor(attr, name, fp32) for attr in FACTORS))


class LohaMethod(DeltaMethod):
    """Registry entry for LoHa (`--method loha`)."""

    name = "loha"
    peft_type = "LOHA"
    config_cls = LohaConfig
    layer_cls = LohaLayer
    default_lr = 1e-3  # its factors start at Kaiming scale and multiply; LyCORIS trains LoHa above LoRA's rate


register(LohaMethod())

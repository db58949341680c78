"""LoKr: the weight update as a Kronecker product of two small matrices (LyCORIS; Yeh et al. 2023, arXiv:2309.14859),
as HF PEFT 0.21.2's LoKrConfig defines it (`--method lokr`).

    ΔW = (alpha / r) * (W1 ⊗ W2)          W1: [out_l, in_m], W2: [out_k, in_n], out = out_l out_k, in = in_m in_n

(out_l, out_k) and (in_m, in_n) split each size into two factors (`factorization`: the pair nearest the square
root, or `decompose_factor` as the first when it divides the size). W2 is a rank-r product W2_a [out_k, r] @ W2_b
[r, in_n] when r < max(out_k, in_n) / 2, else a full matrix (`lokr_w2`); W1 likewise (`lokr_w1_a` @ `lokr_w1_b`)
only with `decompose_both`. Init (`init_weights`): true: W1 (or W1_a) zeros, the rest Kaiming-uniform, so the model
starts as its base; "lycoris": W2 (or W2_b) zeros instead; false: all random (the model changes at once).

Trainable parameters per adapted linear: each factor's size, e.g. a 576 x 576 projection at r = 8 (24 x 24 blocks):
W1 24 * 24 + W2_a 24 * 8 + W2_b 8 * 24 = 960, against LoRA's 9216 at the same r.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftkit.core.registry import register
from peftkit.errors import PeftkitError
from peftkit.methods.lycoris import DeltaLayer, DeltaMethod, LycorisConfig, check_bool, kaiming


@dataclass(frozen=True)
class LokrConfig(LycorisConfig):
    """LoKr's options, named and defaulted as in PEFT's LoKrConfig (see `LycorisConfig` for the shared ones).

    decompose_both: W1 a rank-r product too (when r is small enough). decompose_factor: the first factor of each
    size when it divides it (-1: the pair nearest the square root). rank_dropout_scale: rescale the rows rank
    dropout keeps by 1 / their mean. init_weights: true, false or "lycoris".
    """

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    INITS: ClassVar[tuple[bool | str, ...]] = (True, False, "lycoris")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool(self, "decompose_both")
        check_bool(self, "rank_dropout_scale")
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor >= 1):
            raise PeftkitError(f"decompose_factor must be -1 (near the square root) or a positive integer, got {factor!r}")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Two factors of `dimension` as LyCORIS / PEFT choose them: (factor, dimension / factor) when `factor` > 0
    divides it; else the divisor pair (m <= n) nearest the square root whose m does not exceed `factor` (-1: any).

    >>> factorization(256), factorization(128), factorization(127), factorization(128, 4)
    ((16, 16), (8, 16), (1, 127), (4, 32))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for d in range(2, dimension + 1):  # divisors upward until m reaches the square root or the limit
        if dimension % d:
            continue
        if d > limit:
            break
        m = d
        if d >= dimension // d:
            break
    n = dimension // m
    return min(m, n), max(m, n)


class LokrLayer(DeltaLayer):
    """A linear layer with LoKr adapters: the factors in `lokr_w1` (or `lokr_w1_a` / `lokr_w1_b`) and `lokr_w2`
    (or `lokr_w2_a` / `lokr_w2_b`), per adapter name."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
            setattr(self, attr, nn.ParameterDict())

    def add_factors(self, name: str, config: LokrConfig, r: int, device: torch.device, dtype: torch.dtype) -> None:
        out_l, out_k = factorization(self.out_features, config.decompose_factor)
        in_m, in_n = factorization(self.in_features, config.decompose_factor)
        split_w1 = config.decompose_both and r < max(out_l, in_m) / 2
        split_w2 = r < max(out_k, in_n) / 2
        shapes = {"w1": (out_l, in_m, split_w1), "w2": (out_k, in_n, split_w2)}
        made: dict[str, nn.Parameter] = {}
        for which, (rows, cols, split) in shapes.items():
            parts = {"_a": (rows, r), "_b": (r, cols)} if split else {"": (rows, cols)}
            for suffix, size in parts.items():
                made[which + suffix] = nn.Parameter(torch.empty(size, device=device, dtype=dtype))
                getattr(self, f"lokr_{which}{suffix}")[name] = made[which + suffix]
        if device.type == "meta":
            return
        with torch.no_grad():
            for param in made.values():
                kaiming(param)
            if config.init_weights is True:
                nn.init.zeros_(made["w1"] if "w1" in made else made["w1_a"])
            elif config.init_weights == "lycoris":
                nn.init.zeros_(made["w2"] if "w2" in made else made["w2_b"])

    def _block(self, which: str, name: str, fp32: bool) -> torch.Tensor:
        """W1 or W2 of adapter `name`: the full matrix, or its rank-r product."""
        full = getattr(self, f"lokr_{which}")
        if name in full:
            return self.factor(f"lokr_{which}", name, fp32)
        return self.factor(f"lokr_{which}_a", name, fp32) @ self.factor(f"lokr_{which}_b", name, fp32)

    def unscaled_delta(self, name: str, fp32: bool = False) -> torch.Tensor:
        """W1 ⊗ W2, [out, in]."""
        return torch.kron(self._block("w1", name, fp32), self._block("w2", name, fp32))


class LokrMethod(DeltaMethod):
    """Registry entry for LoKr (`--method lokr`)."""

    name = "lokr"
    peft_type = "LOKR"
    config_cls = LokrConfig
    layer_cls = LokrLayer
    default_lr = 1e-3  # few parameters per layer; LyCORIS trains LoKr at LoRA's rate or above


register(LokrMethod())

"""OFT's config, named and defaulted as HF PEFT 0.21.2's OFTConfig, and the block size each adapted layer gets."""

from __future__ import annotations

import math
from dataclasses import dataclass

from peftkit.core.method import SIZE_MAX, check_positive
from peftkit.core.method_options import DROPOUT, RANK
from peftkit.errors import PeftkitError
from peftkit.methods.lora.config import normalize_targets

DEFAULT_BLOCK_SIZE = 32  # PEFT's oft_block_size default


@dataclass(frozen=True)
class OFTConfig:
    """OFT hyper-parameters (Qiu et al. 2023, arXiv:2306.07280), with PEFT's names and defaults.

    Each adapted linear's input is rotated by a block-diagonal orthogonal matrix before the frozen weight applies.
    Exactly one of `r` (the number of blocks per layer) and `oft_block_size` (the size of each block) is non-zero;
    the other follows from the layer's input width (r x oft_block_size = in_features), which must be divisible.
    `oft_block_size` None means PEFT's 32 when `r` is 0 and 0 when `r` is given (so `--rank 4` alone works; PEFT
    would need oft_block_size=0 spelled out). use_cayley_neumann: the rotation from a truncated Neumann series of
    `num_cayley_neumann_terms` terms instead of a matrix solve. coft: constrained OFT, each block's skew matrix
    projected into a ball of radius eps / sqrt(blocks) around zero before every use. block_share: one block shared by
    every block of a layer. module_dropout: while training, that share of a layer's blocks becomes the identity
    (PEFT 0.21.2 declares it but never applies it; peftkit does what it documents). bias: only "none" (PEFT's
    "all" / "oft_only" train the base model's biases, which a peftkit adapter does not own). init_weights: True
    starts at the identity rotation (the base model); False draws N(0, 0.1), as PEFT does, for tests.
    """

    r: int = 0
    oft_block_size: int | None = None
    module_dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    bias: str = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        if self.r != 0:
            object.__setattr__(self, "r", RANK.check(self.r, required=True))
        if self.oft_block_size is None:
            object.__setattr__(self, "oft_block_size", 0 if self.r else DEFAULT_BLOCK_SIZE)
        elif self.oft_block_size != 0:
            check_positive("oft_block_size", self.oft_block_size)
        if (self.r == 0) == (self.oft_block_size == 0):
            raise PeftkitError(f"OFT takes exactly one of r (blocks per layer, got {self.r}) and oft_block_size (got "
                               f"{self.oft_block_size}): r x oft_block_size is the layer's input width; set the other "
                               "to 0")
        object.__setattr__(self, "module_dropout", DROPOUT.check(self.module_dropout, required=True))
        object.__setattr__(self, "target_modules", normalize_targets(self.target_modules))
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            object.__setattr__(self, "layers_to_transform", (layers,) if isinstance(layers, int) else tuple(layers))
        if self.bias != "none":
            raise PeftkitError(f"OFT bias={self.bias!r} trains the base model's biases, which peftkit's adapters do not "
                               "own; use bias='none'")
        for flag in ("init_weights", "coft", "block_share", "use_cayley_neumann"):
            if not isinstance(getattr(self, flag), bool):
                raise PeftkitError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < math.inf:
            raise PeftkitError(f"eps (COFT's radius) must be a positive number, got {self.eps!r}")
        if not isinstance(self.num_cayley_neumann_terms, int) or not 0 < self.num_cayley_neumann_terms <= 64:
            raise PeftkitError(f"num_cayley_neumann_terms must be an integer in [1, 64], got "
                               f"{self.num_cayley_neumann_terms!r}")

    def block_size(self, path: str, in_features: int) -> int:
        """The block size of the layer at `path` with input width `in_features`; a width the config's r or
        oft_block_size does not divide is an error naming the module and values that would fit (PEFT silently
        picks the nearest divisor instead, with a warning)."""
        wanted = self.r or self.oft_block_size
        assert wanted is not None  # filled by __post_init__
        if wanted <= in_features and in_features % wanted == 0:
            return in_features // self.r if self.r else wanted
        field = "r" if self.r else "oft_block_size"
        fits = " or ".join(str(d) for d in nearest_divisors(in_features, wanted))
        raise PeftkitError(f"OFT {field}={wanted} does not divide the input width {in_features} of module {path!r}; "
                           f"use a divisor of {in_features}, e.g. {field}={fits}")


def nearest_divisors(n: int, value: int) -> list[int]:
    """The divisors of `n` closest to `value` from below and above (one when they coincide or one side has none)."""
    below = next((d for d in range(min(value, n), 0, -1) if n % d == 0), 1)
    above = next((d for d in range(value, min(n, SIZE_MAX) + 1) if n % d == 0), n)
    return sorted({below, above})

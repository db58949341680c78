"""Finite-value checks for the weights peftkit reads and writes (adapters, merge, combine, compress).

A NaN or an infinity in a weight spreads through every forward pass, and an fp32 value beyond the output dtype's
range (torch.finfo(dtype).max: 65504 for fp16, ~3.4e38 for bf16) becomes inf when cast. Nothing non-finite is
written: each tensor is checked once, as it is produced, after the cast to the dtype it is stored in
(`torch.isfinite(t).all()`, one pass over a tensor already in memory). A failure is a one-line PeftkitError naming
the tensor; the callers raise it inside `atomic_dir`, so no output folder is left behind.
"""

from __future__ import annotations

import math

import torch

from peftkit.errors import PeftkitError


def is_finite(tensor: torch.Tensor) -> bool:
    """Every value of `tensor` is finite (integer and bool tensors always are)."""
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def describe(tensor: torch.Tensor) -> str:
    """What is wrong with a non-finite tensor: "2 NaN and 1 infinite values (of 4096)"."""
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    parts = [f"{nan} NaN"] * bool(nan) + [f"{inf} infinite"] * bool(inf)
    return f"{' and '.join(parts)} value{'s' if nan + inf > 1 else ''} (of {tensor.numel()})"


def check_finite(tensor: torch.Tensor, what: str, hint: str = "") -> None:
    """Refuse a tensor holding NaN or inf: "<what> has 1 NaN value (of 128)[; <hint>]"."""
    if not is_finite(tensor):
        raise PeftkitError(f"{what} has {describe(tensor)}{'; ' + hint if hint else ''}")


def cast_checked(tensor: torch.Tensor, dtype: torch.dtype, what: str, hint: str = "") -> torch.Tensor:
    """`tensor.to(dtype)`, refused when the result is not finite: either `tensor` itself holds NaN / inf, or a value
    lies beyond `dtype`'s range (it would be stored as inf). `what` names the tensor in the message."""
    cast = tensor.to(dtype)
    if is_finite(cast):
        return cast
    check_finite(tensor, what, hint)
    largest = float(tensor.abs().max())
    name = str(dtype).removeprefix("torch.")
    raise PeftkitError(f"{what} has values up to {largest:.3g}, beyond {name}'s range (max {torch.finfo(dtype).max:.3g}); "
                       f"stored as {name} they would be infinite{'; ' + hint if hint else ''}")


def check_weights(weights: list[float]) -> list[float]:
    """Adapter weights must be finite numbers (a NaN weight makes every merged tensor NaN)."""
    for weight in weights:
        if not math.isfinite(weight):
            raise PeftkitError(f"adapter weight {weight!r} is not a finite number; give finite --weights")
    return weights

"""LoRA inits that build A and B from the base weight W and leave the base the residual W - s·B A (PiSSA, OLoRA).

    PiSSA (Meng et al. 2024):   W = U S Vᵀ,  B = U_r √(S_r / s),  A = √(S_r / s) V_rᵀ      so s·B A = U_r S_r V_rᵀ
    OLoRA (Büyükakyüz 2024):    W = Q R (QR),  B = Q[:, :r],  A = R[:r]                     as HF PEFT's olora_init

Either way the injected model computes (W - s·B₀A₀) + s·B A, equal to the base at the start. The layer keeps
(A₀, B₀) (`LoraLayer.residual_init`), so the trained adapter is saved as a plain rank-2r LoRA against the ORIGINAL
weights, as PEFT's `path_initial_model_for_weight_conversion` does: A' = [A; A₀], B' = [B, -B₀], since
W + s·(B A - B₀ A₀) = (W - s·B₀ A₀) + s·B A. The other inits (default, gaussian, and the data-driven eva / loftq of
`eva.py` and `methods/loftq.py`) leave the base untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from peftkit.errors import PeftkitError


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A [r, n], B [m, r]) with scale·B·A = U diag(S) Vh, the root of S/scale on each side (balanced,
    as PiSSA does). Used by PiSSA's init, LoftQ's and every SVD that produces an adapter (combine, compress)."""
    root = torch.sqrt(s / scale)
    return root[:, None] * vh, u * root[None, :]


def pissa_factors(w: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀, B₀) from the top-r singular triplets of the fp32 [out, in] weight `w`."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return split_factors(u[:, :r], s[:r], vh[:r], scale)


def olora_factors(w: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀, B₀) = (R[:r], Q[:, :r]) of the QR decomposition of the fp32 [out, in] weight `w` (OLoRA: B₀ has
    orthonormal columns; the scale is not folded in, as in PEFT, so s·B₀A₀ is s times W's leading part)."""
    q, rr = torch.linalg.qr(w)
    return rr[:r].contiguous(), q[:, :r].contiguous()


RESIDUAL_INITS: dict[str, Callable[[torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]]] = {
    "pissa": pissa_factors,
    "olora": olora_factors,
}


def residual_factors(init: str, w: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀, B₀) of init `init` (a key of RESIDUAL_INITS) for the fp32 [out, in] weight `w`."""
    if r > min(w.shape):
        raise PeftkitError(f"{init} rank {r} exceeds the smaller side of a {tuple(w.shape)} weight; lower --rank")
    return RESIDUAL_INITS[init](w, r, scale)

"""Truncated SVD of weight deltas: Δ ≈ B A with B = U_r √S_r, A = √S_r V_rᵀ (Eckart-Young: the best rank-r fit).

Two ways to get the top r singular triplets of an [m, n] delta:
- `torch.svd_lowrank` (Halko, Martinsson & Tropp 2011, randomized range finder): cost ~ m·n·q·(2·niter + 2) with
  oversampling q ≈ 2r; 100x faster than a full SVD when r << min(m, n), with an error a hair above the optimum.
- `torch.linalg.svd`: exact, cost ~ m·n·min(m, n); we switch to it once r is a large fraction of min(m, n), where
  the randomized method loses both its speed advantage and its accuracy.

The energy rule keeps the smallest r whose singular values carry a share `energy` of ‖Δ‖²_F = Σ s_i². A rank past
m·n / (m + n) stores more numbers (r·(m + n)) than the dense delta (m·n): callers cap the rank there.
"""

from __future__ import annotations

import torch

from peftkit.errors import PeftkitError

EXACT_FRACTION = 0.25  # exact SVD once r >= EXACT_FRACTION * min(m, n)
NITER = 2  # subspace iterations of svd_lowrank (>= 2 keeps the extra error under ~1% on decaying spectra)
SEED = 0  # the random test matrix of svd_lowrank is drawn from this seed: same input, same adapter


def dense_cap(m: int, n: int) -> int:
    """Largest rank at which a LoRA (r·(m + n) numbers) is not larger than the dense [m, n] delta (m·n)."""
    return max(1, (m * n) // (m + n))


def check_rank_energy(rank: int | None, energy: float | None) -> None:
    """Exactly one of --rank (> 0) / --energy (in (0, 1]) must be given."""
    if (rank is None) == (energy is None):
        raise PeftkitError("give exactly one of --rank R (a fixed rank) or --energy E (share of ‖Δ‖²_F to keep)")
    if rank is not None and (isinstance(rank, bool) or rank <= 0):
        raise PeftkitError(f"--rank must be a positive integer, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise PeftkitError(f"--energy must be in (0, 1] (the share of the delta's squared Frobenius norm), got {energy}")


def top_svd(delta: torch.Tensor, rank: int, *, seed: int = SEED, niter: int = NITER) -> tuple[torch.Tensor, ...]:
    """(U [m, r], S [r], Vh [r, n]) of the top `rank` singular triplets of fp32 `delta`, descending.

    Randomized (`svd_lowrank`, q = min(2r, min(m, n)), fixed seed) while r < EXACT_FRACTION·min(m, n); exact
    `linalg.svd` above. The seed is restored afterwards so callers' random streams are untouched.
    """
    m, n = delta.shape
    k = min(m, n)
    rank = min(rank, k)
    if rank >= EXACT_FRACTION * k:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    q = min(2 * rank, k)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(delta, q=q, niter=niter)
    return u[:, :rank], s[:rank], v[:, :rank].T


def rank_for_energy(s: torch.Tensor, total: float, energy: float) -> int | None:
    """Smallest r with Σ_{i<r} s_i² >= energy·total, or None when the given s do not reach it."""
    if total <= 0:
        return 1
    kept = torch.cumsum(s.double() ** 2, 0) / total
    hits = torch.nonzero(kept >= energy - 1e-12)
    return int(hits[0]) + 1 if len(hits) else None


def energy_svd(delta: torch.Tensor, energy: float, limit: int) -> tuple[torch.Tensor, ...]:
    """Top triplets for the smallest rank keeping `energy` of ‖Δ‖²_F, never more than `limit`.

    The spectrum past the computed triplets is unknown, so the search widens: k = 32, 64, ... until the kept share
    reaches `energy` or k reaches `limit` (or the exact-SVD threshold, where one exact SVD gives every value).
    """
    total = float(delta.double().pow(2).sum())
    k = min(32, limit)
    while True:
        u, s, vh = top_svd(delta, k)
        r = rank_for_energy(s, total, energy)
        if r is not None or k >= limit or k >= EXACT_FRACTION * min(delta.shape):
            r = min(r or limit, limit)
            if r > len(s):  # the exact branch returned only k values: recompute at the limit
                u, s, vh = top_svd(delta, r)
            return u[:, :r], s[:r], vh[:r]
        k = min(2 * k, limit)


def low_rank_svd(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-`rank` SVD of the product B @ A ([m, k] @ [k, n]) without forming it: QR of both factors, then
    the SVD of the small k x k core (B = Q_b R_b, Aᵀ = Q_a R_a, B A = Q_b (R_b R_aᵀ) Q_aᵀ)."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    uc, s, vhc = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    rank = min(rank, len(s))
    return qb @ uc[:, :rank], s[:rank], vhc[:rank] @ qa.T


def relative_error(delta: torch.Tensor, s_kept: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error, energy kept) of the truncation keeping singular values `s_kept`.

    ‖Δ - Δ_r‖²_F = ‖Δ‖²_F - Σ s_i² for exact top triplets (a tiny negative remainder from rounding is clamped).
    """
    total = float(delta.double().pow(2).sum())
    if total == 0:
        return 0.0, 1.0
    kept = float(s_kept.double().pow(2).sum())
    return max(total - kept, 0.0) ** 0.5 / total**0.5, min(kept / total, 1.0)

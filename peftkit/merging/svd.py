"""Truncated SVD of weight deltas: Δ ≈ B A with B = U_r √S_r, A = √S_r V_rᵀ (Eckart-Young: the best rank-r fit).

Two ways to get the top r singular triplets of an [m, n] delta, chosen per matrix by cost (`svd_path`):
- `torch.linalg.svd`: exact (the optimum; what mergekit's extract-lora computes), cost ~ m·n·min(m, n).
- `torch.svd_lowrank` (Halko, Martinsson & Tropp 2011, randomized range finder): cost ~ m·n·q·(2·niter + 2) with
  oversampling q = 2r; 100x faster than a full SVD when r << min(m, n), with an error a hair above the optimum
  (+0.2 % on a rank-24-plus-noise delta at r = 8 and 32; more on flat spectra).
The exact SVD is used wherever it costs little: on small matrices (m·n·min(m, n) <= SMALL_WORK: every matrix of
the embedded SmolLM2-135M) and once r is a large fraction of min(m, n) (EXACT_FRACTION), where the randomized
method loses both its speed advantage and its accuracy. Large matrices at small ranks (4096-class layers of 7B
models) stay randomized: there the exact SVD costs 10-250x more (`benchmarks/compress_bench.py`).

The energy rule keeps the smallest r whose singular values carry a share `energy` of ‖Δ‖²_F = Σ s_i². A rank past
m·n / (m + n) stores more numbers (r·(m + n)) than the dense delta (m·n): callers cap the rank there.
"""

from __future__ import annotations

import torch

from peftkit.errors import PeftkitError

EXACT_FRACTION = 0.25  # exact SVD once r >= EXACT_FRACTION * min(m, n): there it is as fast (compress_bench.py)
# Exact SVD whenever m·n·min(m, n) <= SMALL_WORK (1024³): an exact SVD then takes ~0.5-1 s at most on one core.
# Measured with `compress_bench.py --calibrate` on one thread of the 2-core reference machine (loaded: 4e-10 to
# 1.2e-9 s per unit of m·n·min(m, n)): 0.015-0.03 s for 192x576, 0.09-0.19 s for 576x576, 0.15-0.5 s for
# 1536x576 / 576x1536, 0.5-1.2 s for 1024², 3.5 s for 2048² (where r = 8 randomized takes 0.05 s).
SMALL_WORK = 1024**3
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


def svd_path(m: int, n: int, rank: int) -> str:
    """"exact" or "randomized": how `top_svd` computes the top `rank` triplets of an [m, n] matrix (see the module
    docstring: exact where it costs little, randomized where the exact SVD would cost much more)."""
    k = min(m, n)
    return "exact" if m * n * k <= SMALL_WORK or rank >= EXACT_FRACTION * k else "randomized"


def top_svd(delta: torch.Tensor, rank: int, *, seed: int = SEED, niter: int = NITER) -> tuple[torch.Tensor, ...]:
    """(U [m, r], S [r], Vh [r, n]) of the top `rank` singular triplets of fp32 `delta`, descending, computed the
    way `svd_path` says: exact `linalg.svd`, or `svd_lowrank` with q = min(2r, min(m, n)) and a fixed seed (restored
    afterwards, so callers' random streams are untouched). Same input, same output."""
    m, n = delta.shape
    rank = min(rank, m, n)
    if svd_path(m, n, rank) == "exact":
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    return randomized_svd(delta, rank, seed=seed, niter=niter)


def randomized_svd(delta: torch.Tensor, rank: int, *, seed: int = SEED, niter: int = NITER) -> tuple[torch.Tensor, ...]:
    """`top_svd`'s randomized path, whatever the matrix's size: `svd_lowrank` with q = min(2r, min(m, n))."""
    rank = min(rank, *delta.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(delta, q=min(2 * rank, min(delta.shape)), niter=niter)
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

    Where the exact SVD is chosen (`svd_path`), one exact SVD gives every value. Otherwise the spectrum past the
    computed triplets is unknown, so the search widens: k = 32, 64, ... until the kept share reaches `energy`, k
    reaches `limit`, or the exact SVD becomes the cheaper way.
    """
    total = float(delta.double().pow(2).sum())
    m, n = delta.shape
    k = min(32, limit)
    while svd_path(m, n, k) == "randomized":
        u, s, vh = top_svd(delta, k)
        r = rank_for_energy(s, total, energy)
        if r is not None or k >= limit:
            r = min(r or limit, limit)
            return u[:, :r], s[:r], vh[:r]
        k = min(2 * k, limit)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank_for_energy(s, total, energy) or limit, limit)
    return u[:, :r], s[:r], vh[:r]


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

"""Randomized truncated SVD (our `svd_lowrank` path) vs exact `torch.linalg.svd` on 4096-class deltas.

    python benchmarks/compress_bench.py [--m 4096 --n 4096 --alpha 0.8 --ranks 8,16,32,64,128,256,512,1024]

The delta is U diag(s) Vᵀ with random orthogonal U, V and a power-law spectrum s_i = i^-alpha plus a small noise
floor (alpha ≈ 0.5-1 resembles fine-tune deltas; smaller alpha is flatter and harder). The exact SVD is timed once
(its cost does not depend on r); the randomized one at every r, with q = 2r and niter = 2 exactly as `compress`
runs it below the exact-SVD threshold. Errors are relative Frobenius errors ‖Δ − Δ_r‖_F / ‖Δ‖_F. One run; the
machine's load at the time matters.
"""

from __future__ import annotations

import argparse
import time

import torch

from peftkit.merging.svd import EXACT_FRACTION, NITER, SEED, relative_error


def make_delta(m: int, n: int, alpha: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -alpha
    s = s + 1e-3 * s[0]  # noise floor
    return (u * s) @ v.T


def randomized(delta: torch.Tensor, rank: int) -> tuple[float, torch.Tensor]:
    torch.manual_seed(SEED)
    start = time.perf_counter()
    _, s, _ = torch.svd_lowrank(delta, q=min(2 * rank, min(delta.shape)), niter=NITER)
    return time.perf_counter() - start, s[:rank]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--ranks", default="8,16,32,64,128,256,512,1024")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    print(f"torch threads: {torch.get_num_threads()}; delta {args.m}x{args.n}, s_i = i^-{args.alpha} + floor")
    delta = make_delta(args.m, args.n, args.alpha)
    start = time.perf_counter()
    exact_s = torch.linalg.svdvals(delta)  # same LAPACK work as linalg.svd without the vectors: a lower bound
    t_vals = time.perf_counter() - start
    start = time.perf_counter()
    torch.linalg.svd(delta, full_matrices=False)
    t_exact = time.perf_counter() - start
    print(f"exact linalg.svd: {t_exact:.1f} s (svdvals alone {t_vals:.1f} s)")
    print(f"{'r':>6} {'lowrank s':>10} {'speed-up':>9} {'err exact':>10} {'err ours':>10} {'extra err':>10}  path in compress")
    for rank in ranks:
        t, s = randomized(delta, rank)
        best, _ = relative_error(delta, exact_s[:rank])
        ours, _ = relative_error(delta, s)
        path = "exact" if rank >= EXACT_FRACTION * min(delta.shape) else "randomized"
        print(f"{rank:>6} {t:>10.2f} {t_exact / t:>8.1f}x {best:>10.4f} {ours:>10.4f} {100 * (ours / best - 1):>9.2f}%  {path}")


if __name__ == "__main__":
    main()

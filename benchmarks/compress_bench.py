"""`compress`'s SVD against the exact optimum: randomized vs exact `torch.linalg.svd`, three ways.

    python benchmarks/compress_bench.py [--m 4096 --n 4096 --alpha 0.8 --ranks 8,16,32,64,128,256,512,1024]
    python benchmarks/compress_bench.py --embedded [--ranks 8,32 --repeats 3 --workdir /tmp/compress_bench]
    python benchmarks/compress_bench.py --calibrate [--shapes 192x576,576x576,1536x576,576x1536,1024x1024]

Default: one 4096-class delta U diag(s) Vᵀ with random orthogonal U, V and a power-law spectrum s_i = i^-alpha plus
a small noise floor (alpha ≈ 0.5-1 resembles fine-tune deltas; smaller alpha is flatter and harder). The exact SVD
is timed once (its cost does not depend on r), the randomized one (q = 2r, niter = 2) at every r; the last column
is the path `compress` takes (`svd_path`).

--embedded: a synthetic full fine-tune of the embedded model: every one of the 210 decoder linears gets a rank-24
delta (s_i = i^-0.5, random orthogonal U, V) plus Gaussian noise of 10% of its Frobenius norm, scaled to 1% of
‖W‖_F, saved in fp32. Then, on the same deltas: the exact optimum (`torch.linalg.svd` of every matrix, which is what
mergekit's extract-lora runs), the randomized SVD on every matrix (what `compress` did before it chose per
matrix), and `peftkit compress` itself (in process, whole command: read, SVD, write). Errors are the mean over the
210 modules of ‖Δ − Δ_r‖_F / ‖Δ‖_F; times are medians of --repeats runs.

--calibrate: seconds per unit of m·n·min(m, n) for the exact SVD and per unit of m·n·q·(2·niter + 2) for the
randomized one (r = 8), the numbers behind `svd.SMALL_WORK`.

The machine's load at the time matters (`torch.get_num_threads()` is printed).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from peftkit.io.models import embedded_folder
from peftkit.merging.compress import compress
from peftkit.merging.svd import NITER, randomized_svd, relative_error, svd_path, top_svd

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_delta(m: int, n: int, s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """U diag(s) Vᵀ ([m, n]) with random orthonormal U [m, len(s)], V [n, len(s)]."""
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g))
    return (u * s) @ v.T


def median_seconds(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    """(median wall time over `repeats` calls, the last call's result)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def power_law(args: argparse.Namespace) -> None:
    k = min(args.m, args.n)
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -args.alpha
    delta = make_delta(args.m, args.n, s + 1e-3 * s[0], torch.Generator().manual_seed(0))  # + noise floor
    print(f"delta {args.m}x{args.n}, s_i = i^-{args.alpha} + floor")
    t_exact, (_, exact_s, _) = median_seconds(lambda: torch.linalg.svd(delta, full_matrices=False), 1)
    print(f"exact linalg.svd: {t_exact:.1f} s")
    print(f"{'r':>6} {'lowrank s':>10} {'speed-up':>9} {'err exact':>10} {'err rand.':>10} {'extra err':>10}  path in compress")
    for rank in [int(r) for r in args.ranks.split(",")]:
        t, (_, s_r, _) = median_seconds(partial(randomized_svd, delta, rank), args.repeats)
        best, ours = relative_error(delta, exact_s[:rank])[0], relative_error(delta, s_r)[0]
        print(f"{rank:>6} {t:>10.3f} {t_exact / t:>8.1f}x {best:>10.4f} {ours:>10.4f} {100 * (ours / best - 1):>9.4f}%  "
              f"{svd_path(args.m, args.n, rank)}")


def calibrate(args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(0)
    print(f"{'shape':>10} {'exact s':>8} {'s / m·n·k':>10} {'rand. s':>8} {'s / m·n·q·(2niter+2)':>21} {'ratio':>6}")
    for shape in args.shapes.split(","):
        m, n = (int(x) for x in shape.split("x"))
        delta = torch.randn(m, n, generator=g)
        t_exact, _ = median_seconds(partial(torch.linalg.svd, delta, full_matrices=False), args.repeats)
        t_rand, _ = median_seconds(partial(randomized_svd, delta, 8), args.repeats)
        print(f"{shape:>10} {t_exact:>8.3f} {t_exact / (m * n * min(m, n)):>10.2e} {t_rand:>8.4f} "
              f"{t_rand / (m * n * 16 * (2 * NITER + 2)):>21.2e} {t_exact / t_rand:>5.0f}x")


def synthetic_finetune(folder: Path, seed: int = 0) -> None:
    """Save the embedded model + a rank-24-plus-10%-noise delta on every decoder linear at `folder` (fp32)."""
    base = embedded_folder()
    tensors = load_file(base / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    s = torch.arange(1, 25, dtype=torch.float32) ** -0.5
    for key in sorted(tensors):
        if key.endswith(".weight") and key.split(".")[-2] in DECODER_LINEARS:
            w = tensors[key].float()
            low = make_delta(*w.shape, s, g)
            noise = torch.randn(w.shape, generator=g)
            delta = low + noise * (0.1 * low.norm() / noise.norm())
            tensors[key] = w + delta * (0.01 * w.norm() / delta.norm())
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(base / "config.json", folder / "config.json")


def deltas_of(folder: Path) -> list[torch.Tensor]:
    """The changed decoder linears' deltas ([out, in], fp32), exactly as `compress` computes them."""
    base, ft = load_file(embedded_folder() / "model.safetensors"), load_file(folder / "model.safetensors")
    return [ft[k].float() - base[k].float() for k in sorted(ft) if not torch.equal(ft[k], base[k]) and ft[k].ndim == 2]


def values_of(svd: Callable[..., tuple[torch.Tensor, ...]], deltas: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """The top `rank` singular values of every delta, by `svd` (`top_svd` or `randomized_svd`)."""
    return [svd(d, rank)[1] for d in deltas]


def mean_error(deltas: list[torch.Tensor], values: list[torch.Tensor], rank: int) -> float:
    return statistics.mean(relative_error(d, s[:rank])[0] for d, s in zip(deltas, values, strict=True))


def embedded(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    ft = work / "finetuned"
    if not (ft / "model.safetensors").is_file():
        synthetic_finetune(ft)
    deltas = deltas_of(ft)
    print(f"{len(deltas)} decoder linears changed; medians of {args.repeats} runs")
    t_exact, exact = median_seconds(lambda: [torch.linalg.svd(d, full_matrices=False)[1] for d in deltas], args.repeats)
    head = f"{'r':>3} {'optimum err':>11} {'exact s':>8} | {'rand. err':>10} {'excess':>8} {'SVD s':>6} | "
    print(head + f"{'compress err':>12} {'excess':>8} {'SVD s':>6} {'wall s':>7}  paths")
    for rank in [int(r) for r in args.ranks.split(",")]:
        best = mean_error(deltas, exact, rank)
        t_rand, rand = median_seconds(partial(values_of, randomized_svd, deltas, rank), args.repeats)
        t_svd, _ = median_seconds(partial(values_of, top_svd, deltas, rank), args.repeats)
        t_wall, report = median_seconds(partial(compress, None, str(ft), str(work / f"r{rank}"), rank=rank, overwrite=True),
                                        args.repeats)
        ours, fast = statistics.mean(row.rel_error for row in report.rows), mean_error(deltas, rand, rank)
        paths = sorted({svd_path(*d.shape, rank) for d in deltas})
        print(f"{rank:>3} {best:>11.5f} {t_exact:>8.2f} | {fast:>10.5f} {100 * (fast / best - 1):>7.4f}% {t_rand:>6.2f} | "
              f"{ours:>12.5f} {100 * (ours / best - 1):>7.4f}% {t_svd:>6.2f} {t_wall:>7.2f}  {','.join(paths)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--embedded", action="store_true", help="the synthetic full fine-tune of the embedded model")
    parser.add_argument("--calibrate", action="store_true", help="seconds per unit of work of both SVDs")
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--ranks", default=None, help="default 8,...,1024 (8,32 with --embedded)")
    parser.add_argument("--shapes", default="192x576,576x576,1536x576,576x1536,1024x1024,2048x2048")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/compress_bench")
    args = parser.parse_args()
    args.ranks = args.ranks or ("8,32" if args.embedded else "8,16,32,64,128,256,512,1024")
    print(f"torch threads: {torch.get_num_threads()}")
    calibrate(args) if args.calibrate else embedded(args) if args.embedded else power_law(args)


if __name__ == "__main__":
    main()

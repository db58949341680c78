"""svd.py: the per-matrix choice of exact or randomized SVD, each against the exact truncation, the energy rule's
widening search, factor split, SVD of a product, and the CLI."""

import pytest
import torch

from peftkit.cli import main
from peftkit.merging.svd import energy_svd, low_rank_svd, randomized_svd, relative_error, svd_path, top_svd
from peftkit.methods.lora.inits import split_factors
from tests.tiny import tiny_model


def known(m: int, n: int, s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """U diag(s) Vᵀ with random orthonormal U, V: its singular values are exactly `s` (and zeros)."""
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g))
    return (u * s) @ v.T


def rank24_plus_noise(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A fine-tune-like delta: rank 24 with s_i = i^-0.5, plus Gaussian noise of 10% of its Frobenius norm."""
    g = torch.Generator().manual_seed(seed)
    low = known(m, n, torch.arange(1, 25) ** -0.5, g)
    noise = torch.randn(m, n, generator=g)
    return low + noise * (0.1 * low.norm() / noise.norm())


def test_paths_exact_where_cheap_randomized_on_large_matrices_at_small_ranks():
    for m, n in ((576, 576), (192, 576), (1536, 576), (576, 1536)):  # every linear of the embedded SmolLM2-135M
        assert all(svd_path(m, n, r) == "exact" for r in (1, 8, 32, 256))
    for m, n in ((4096, 4096), (11008, 4096), (2048, 2048)):  # 7B-class layers
        assert svd_path(m, n, 8) == svd_path(m, n, 64) == "randomized"
        assert svd_path(m, n, min(m, n) // 4) == "exact"  # a large share of min(m, n): exact is as fast


@pytest.mark.parametrize("rank", [8, 32])
def test_small_matrix_gets_the_optimum_where_randomized_would_not(rank):
    delta = rank24_plus_noise(192, 576)
    best, _ = relative_error(delta, torch.linalg.svdvals(delta)[:rank])
    u, s, vh = top_svd(delta, rank)
    assert abs(relative_error(delta, s)[0] / best - 1) <= 1e-4
    assert float(torch.linalg.norm(delta - u @ torch.diag(s) @ vh) / delta.norm()) == pytest.approx(best, rel=1e-4)
    assert relative_error(delta, randomized_svd(delta, rank)[1])[0] > best * (1 + 5e-4)  # what the choice gains


def test_large_matrix_at_small_rank_stays_randomized_and_close():
    exact = torch.arange(1, 201) ** -0.5
    delta = known(1100, 1100, exact, torch.Generator().manual_seed(2))  # m·n·min(m, n) above SMALL_WORK
    s_rand = randomized_svd(delta, 8)[1]
    u, s, vh = top_svd(delta, 8)
    assert torch.equal(s, s_rand)  # the randomized path was taken
    best, _ = relative_error(delta, exact[:8])
    assert best <= relative_error(delta, s)[0] <= best * 1.01
    a, b = split_factors(u, s, vh, scale=2.0)
    assert torch.allclose(2.0 * b @ a, u @ torch.diag(s) @ vh, atol=1e-5)


@pytest.mark.parametrize("shape", [(192, 576), (1100, 1100)])
def test_same_input_same_factors(shape):
    delta = rank24_plus_noise(*shape)
    first, again = top_svd(delta, 8), top_svd(delta, 8)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))


def test_energy_search_widens_on_a_large_matrix_and_is_exact_on_a_small_one():
    s = torch.linspace(1.0, 0.5, 100)  # half of ‖Δ‖²_F takes more values than the first try (k = 32) holds
    expected = int((torch.cumsum(s**2, 0) / (s**2).sum() >= 0.5).nonzero()[0]) + 1
    assert expected > 32 and svd_path(1100, 1100, 64) == "randomized"
    assert len(energy_svd(known(1100, 1100, s, torch.Generator().manual_seed(3)), 0.5, limit=500)[1]) == expected
    small = rank24_plus_noise(192, 576)
    exact = torch.linalg.svdvals(small)
    want = int((torch.cumsum(exact.double() ** 2, 0) / small.double().pow(2).sum() >= 0.9).nonzero()[0]) + 1
    assert len(energy_svd(small, 0.9, limit=144)[1]) == want


def test_low_rank_svd_of_a_product_is_exact():
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(40, 6, generator=g), torch.randn(6, 30, generator=g)
    u, s, vh = low_rank_svd(b, a, 6)
    assert torch.allclose(u @ torch.diag(s) @ vh, b @ a, atol=1e-4)
    assert torch.allclose(s, torch.linalg.svdvals(b @ a)[:6], atol=1e-4)


def test_cli_compress_table_and_bad_rank(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    ft = tiny_model("llama", seed=1)
    ft.save_pretrained(tmp_path / "ft")
    main(["compress", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "-o", str(tmp_path / "a"), "--energy", "0.5"])
    out = capsys.readouterr().out
    assert "rel. error" in out and "DROPPED" in out and "MB" in out and (tmp_path / "a" / "adapter_config.json").is_file()
    with pytest.raises(SystemExit) as info:
        main(["compress", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "-o", str(tmp_path / "b"), "--rank", "0"])
    assert info.value.code == 2 and "--rank must be a positive" in capsys.readouterr().err and not (tmp_path / "b").exists()

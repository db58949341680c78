"""svd.py: randomized top-r SVD against the exact truncation, factor split, SVD of a product, and the CLI."""

import pytest
import torch

from peftkit.cli import main
from peftkit.merging.svd import EXACT_FRACTION, low_rank_svd, relative_error, top_svd
from peftkit.methods.lora.inits import split_factors
from tests.tiny import tiny_model


def decaying(m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float32) ** -1.0
    return u @ torch.diag(s) @ v.T


def test_randomized_is_close_to_exact_and_split_rebuilds_it():
    delta = decaying(256, 192)
    rank = 8
    assert rank < EXACT_FRACTION * 192  # the randomized branch
    u, s, vh = top_svd(delta, rank)
    exact = torch.linalg.svdvals(delta)
    err, kept = relative_error(delta, s)
    best, _ = relative_error(delta, exact[:rank])
    assert best <= err <= best * 1.01
    a, b = split_factors(u, s, vh, scale=2.0)
    assert torch.allclose(2.0 * b @ a, u @ torch.diag(s) @ vh, atol=1e-5)
    assert torch.allclose(float(torch.linalg.norm(delta - b @ a * 2.0)) / float(delta.norm()) * torch.ones(1), torch.tensor([err]), atol=1e-4)
    assert torch.equal(top_svd(delta, rank)[1], s)  # fixed seed: the same input gives the same adapter


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

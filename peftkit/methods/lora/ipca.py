"""Incremental PCA over batches of row vectors (Ross et al. 2008, scikit-learn's IncrementalPCA), in torch, computed
as HF PEFT's EVA computes it (so the two give the same components on the same batches):

- the running mean and variance are updated in fp64 (Chan et al.'s pairwise update);
- each batch after the first is centred on its own mean and stacked under the previous components scaled by their
  singular values, plus one row correcting for the shift of the mean; that stack's SVD gives the new components;
- the SVD is torch's randomized `svd_lowrank` with q = 2k and 4 power iterations, seeded with 42 for every call,
  and the signs are fixed so each component's largest-magnitude entry is positive (scikit-learn's svd_flip on V).

explained_variance_ratio is S² over the total variance seen (the sum of the per-feature variances times the count).
"""

from __future__ import annotations

import torch

SEED = 42
POWER_ITERATIONS = 4


class IncrementalPca:
    """The first `k` principal components of every row fed to `partial_fit` so far."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.seen = torch.tensor([0])
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.components: torch.Tensor | None = None        # [k, d]
        self.singular_values: torch.Tensor | None = None   # [k]
        self.explained_variance_ratio: torch.Tensor | None = None

    @torch.no_grad()
    def partial_fit(self, x: torch.Tensor) -> None:
        """Update the components with the rows of `x` ([n, d], n >= k)."""
        x = x.float().clone()
        n = x.shape[0]
        mean, var, total = self._moments(x)
        if self.components is None:
            x -= mean
        else:
            assert self.singular_values is not None and self.mean is not None
            batch_mean = x.mean(0)
            x -= batch_mean
            shift = torch.sqrt(self.seen.double() / total * n) * (self.mean - batch_mean)
            x = torch.vstack((self.singular_values.view(-1, 1) * self.components, x, shift))
        with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device]):
            torch.manual_seed(SEED)
            _, s, v = torch.svd_lowrank(x, q=2 * self.k, niter=POWER_ITERATIONS)
        vt = v.mH
        biggest = vt.abs().argmax(1)
        vt = vt * torch.sign(vt[torch.arange(vt.shape[0]), biggest]).view(-1, 1)
        self.seen, self.mean, self.var = total, mean, var
        self.components, self.singular_values = vt[: self.k], s[: self.k]
        self.explained_variance_ratio = (s**2 / torch.sum(var * total))[: self.k]

    def _moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, variance, count) of every row seen, this batch included (fp64)."""
        count = torch.tensor([x.shape[0]], device=x.device)
        total = self.seen.to(x.device) + count
        last_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if self.mean is None \
            else self.mean * self.seen
        new_sum = x.sum(0, dtype=torch.float64)
        centred = x - new_sum / count
        scatter = centred.square().sum(0, dtype=torch.float64) - centred.sum(0, dtype=torch.float64).square() / count
        if self.var is None:
            return (last_sum + new_sum) / total, scatter / total, total
        ratio = self.seen.double() / count
        scatter = self.var * self.seen + scatter + ratio / total * (last_sum / ratio - new_sum).square()
        return (last_sum + new_sum) / total, scatter / total, total

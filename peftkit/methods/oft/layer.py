"""The OFT module: a frozen linear layer whose input is first rotated by a learned block-diagonal orthogonal matrix.

    y = W (x R) + b          R = diag(R_1, ..., R_r), each R_j an orthogonal b x b block (r x b = d_in)

Each block is the Cayley transform of a skew-symmetric matrix Q_j = U_j - U_j^T, where U_j is strictly upper
triangular and its b(b-1)/2 entries, row by row, are the trained parameters (`oft_R`: [r, b(b-1)/2], one row when
the blocks share them). The transform is computed as HF PEFT 0.21.2 computes it, so a saved adapter means the same:

    exact (use_cayley_neumann false)   R_j = (I - Q)(I + Q)^-1                        (a batched solve)
    Neumann series of n terms          R_j = I + 2Q + 2Q^2 + ... + 2Q^(m-1) + Q^m,   m = max(n - 1, 3) for n >= 3
                                       (I + 2Q for n = 2, I for n = 1): a truncation of (I + Q)(I - Q)^-1

(the two are transposes of each other for the same Q; each is orthogonal, the series approximately). Parameters at
zero give R = I, so an injected model equals its base until it trains. Merging folds R into W: W <- W R^T, block
by block, in fp32 (the dense d_in x d_in matrix is never built); unmerging multiplies by the blocks' inverses.
Works for `nn.Linear` and GPT-2's `Conv1D` (weight [in, out]); HF PEFT itself refuses Conv1D for OFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from peftkit.core.method import AdapterLayer


@dataclass(frozen=True)
class Rotation:
    """How one adapter's parameters become a layer's rotation: `blocks` blocks of size `block` (`shared`: all one
    parameter row), the Neumann terms (None: the exact Cayley solve), COFT's radius (None: off), module dropout."""

    block: int
    blocks: int
    shared: bool = False
    neumann_terms: int | None = 5
    coft_eps: float | None = None
    dropout: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        """The parameter's shape, as PEFT saves it: [r, b(b-1)/2], one row when the blocks share it."""
        return (1 if self.shared else self.blocks, self.block * (self.block - 1) // 2)


def skew(vec: torch.Tensor, block: int) -> torch.Tensor:
    """[n, b(b-1)/2] -> [n, b, b]: U - U^T, U strictly upper triangular holding `vec` row by row."""
    rows, cols = torch.triu_indices(block, block, 1, device=vec.device)
    upper = vec.new_zeros(vec.shape[0], block, block)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(1, 2)


def cayley(q: torch.Tensor, neumann_terms: int | None) -> torch.Tensor:
    """The orthogonal blocks of skew-symmetric `q` [n, b, b] (module docstring: exact, or PEFT's Neumann series)."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if neumann_terms is None:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    if neumann_terms == 1:
        return eye.clone()
    out = eye + 2 * q
    if neumann_terms == 2:
        return out
    top, power = max(neumann_terms - 1, 3), q
    for k in range(2, top + 1):
        power = torch.bmm(power, q)
        out = out + (2 * power if k < top else power)
    return out


@torch.no_grad()
def project_(param: torch.Tensor, eps: float) -> None:
    """COFT: rescale in place every row whose skew matrix has Frobenius norm above eps / sqrt(rows) onto that
    radius (‖U - U^T‖_F = sqrt(2) ‖row‖)."""
    radius = eps / math.sqrt(param.shape[0])
    norm = math.sqrt(2) * param.norm(dim=1, keepdim=True)
    param.copy_(torch.where(norm <= radius, param, param * (radius / norm)))


def drop_blocks(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Module dropout: int(p * n) of the n blocks, chosen at random, replaced by the identity (n > 1)."""
    n = blocks.shape[0]
    dropped = torch.randperm(n, device=blocks.device)[: int(p * n)]
    mask = torch.zeros(n, 1, 1, device=blocks.device, dtype=blocks.dtype).index_fill_(0, dropped, 1.0)
    return blocks * (1 - mask) + mask * torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)


def rotate(h: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """h [..., n b] times diag(blocks) [n, b, b], as row vectors: each b-wide slice of h by its own block. The
    batched product reads h through a transposed view, so autograd saves h itself (shared by q / k / v)."""
    n, b = blocks.shape[0], blocks.shape[-1]
    flat = h.reshape(-1, n, b).transpose(0, 1)
    return torch.bmm(flat, blocks).transpose(0, 1).reshape(h.shape)


def in_features(module: nn.Module) -> int:
    """The input width of a linear (or of the one an AdapterLayer wraps): nn.Linear's in_features, Conv1D's rows."""
    base = getattr(module, "base_layer", module)
    return base.in_features if isinstance(base, nn.Linear) else int(cast(torch.Tensor, base.weight).shape[0])


class OftLayer(AdapterLayer):
    """Wraps one linear layer (`base_layer`) and holds any number of named OFT adapters (`oft_R`) for it."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # GPT-2 Conv1D stores W as [in, out]
        self.in_features = in_features(base_layer)
        self.oft_R = nn.ParameterDict()
        self.rotations: dict[str, Rotation] = {}
        self.train(base_layer.training)  # module dropout follows the model's mode (an eval model stays eval)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (code that reads `module.weight` keeps working after injection)."""
        return cast(torch.Tensor, self.base_layer.weight)

    def add_adapter(self, name: str, rotation: Rotation, init_identity: bool = True) -> None:
        """Adapter `name`: zeros (R = I) or, without `init_identity`, N(0, 0.1) as PEFT's init_weights=False."""
        w = self.weight
        param = torch.zeros(rotation.shape, device=w.device, dtype=w.dtype)
        if not init_identity and w.device.type != "meta":
            param.normal_(0.0, 0.1)
        self.oft_R[name] = nn.Parameter(param)
        self.rotations[name] = rotation

    def blocks(self, name: str, merging: bool = False) -> torch.Tensor:
        """Adapter `name`'s rotation blocks [r, b, b] (COFT's projection applied to the parameter first, module
        dropout while training); `merging`: in fp32, detached, without dropout."""
        spec = self.rotations[name]
        if spec.coft_eps is not None:
            project_(self.oft_R[name], spec.coft_eps)
        vec = self.oft_R[name].detach().float() if merging else self.oft_R[name]
        out = cayley(skew(vec, spec.block), spec.neumann_terms)
        if self.training and not merging and spec.dropout > 0 and not spec.shared:
            out = drop_blocks(out, spec.dropout)
        return out.expand(spec.blocks, -1, -1) if spec.shared else out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """base(x R): x in the adapter's dtype (under autocast as it comes, to keep one saved copy), cast back."""
        name = self.active_adapter
        if name is None or self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        blocks = self.blocks(name)
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(blocks.dtype)
        return self.base_layer(rotate(h, blocks).to(x.dtype), *args, **kwargs)

    def _rotate_weight(self, blocks: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The fp32 weight `w` (base layout) with the input rotated by diag(blocks): W R^T for [out, in]."""
        w_out_in = w.T if self.fan_in_fan_out else w
        folded = rotate(w_out_in, blocks.transpose(1, 2))
        return folded.T if self.fan_in_fan_out else folded

    def _write(self, w: torch.Tensor) -> None:
        self.weight.data.copy_(w.to(self.weight.dtype))

    def merge(self) -> None:
        """Fold the active adapter into the base weight (W <- W R^T, in fp32, rounded once), once."""
        name = self.active_adapter
        if name is None or name in self.merged_adapters:
            return
        self._write(self._rotate_weight(self.blocks(name, merging=True), self.weight.detach().float()))
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take every merged adapter out again: W <- W (R^T)^-1, block by block (the Neumann R is not exactly
        orthogonal, so the inverse, not the transpose)."""
        while self.merged_adapters:
            inverse = torch.linalg.inv(self.blocks(self.merged_adapters.pop(), merging=True))
            self._write(self._rotate_weight(inverse, self.weight.detach().float()))

    def unload(self, names: list[str]) -> nn.Module:
        """The base layer with adapters `names` folded in, one after the other, in fp32 and rounded once."""
        w = self.weight.detach().float()
        for name in names:
            w = self._rotate_weight(self.blocks(name, merging=True), w)
        self._write(w)
        return self.base_layer

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.rotations.pop(name, None)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, adapters={self.adapter_names()}"

"""The LoRA module: a frozen linear layer plus low-rank updates (Hu et al. 2021, arXiv:2106.09685).

    y = W x + b + scaling * B(A(dropout(x)))        A: [r, d_in], B: [d_out, r], scaling = alpha / r
                                                    (alpha / sqrt(r) with rsLoRA, Kalajdzic 2023)

B starts at zero, so an injected model equals its base until it trains. Works for `nn.Linear` (weight [out, in])
and GPT-2's `Conv1D` (weight [in, out], PEFT's `fan_in_fan_out`). Merging adds scaling * B @ A to W in fp32 and
rounds once to W's dtype. An adapter added with `use_dora` also has a magnitude vector (`lora_magnitude_vector`,
DoRA: the formulas are in `dora.py`); merging it writes g ⊙_row (W + scaling * B A).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from peftkit.core.method import AdapterLayer
from peftkit.errors import PeftkitError
from peftkit.methods.lora.dora import NormCache, dora_delta, row_norm
from peftkit.methods.lora.inits import RESIDUAL_INITS, residual_factors


class LoraLayer(AdapterLayer):
    """Wraps one linear layer (`base_layer`) and holds any number of named LoRA adapters for it."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # GPT-2 Conv1D stores W as [in, out]
        self.out_features: int
        self.in_features: int
        if isinstance(base_layer, nn.Linear):
            # nn.Linear's own sizes: a bitsandbytes 4-bit weight is stored packed, so its shape is not [out, in]
            self.out_features, self.in_features = base_layer.out_features, base_layer.in_features
        else:
            self.in_features, self.out_features = self.weight.shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only: m, one value per output row
        self.scaling: dict[str, float] = {}
        self.residual_init: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA / OLoRA: (A₀, B₀)
        self.merged_adapters: list[str] = []
        self.dora_norms = NormCache()  # ‖W + s·B A‖_row per DoRA adapter, reused while not training
        self.merge_scale: dict[str, torch.Tensor] = {}  # DoRA: g = m / ‖W + s·B A‖_row of a merged adapter

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (so code that reads `module.weight` keeps working after injection). A linear layer's
        weight is a tensor (a Parameter, or bitsandbytes' Params4bit); `nn.Module.__getattr__` types it as
        `Tensor | Module`."""
        return cast(torch.Tensor, self.base_layer.weight)

    def factor_a(self, name: str) -> nn.Linear:
        """A of adapter `name`, [r, in]: `lora_A` holds only the nn.Linear made by `add_adapter`."""
        return cast(nn.Linear, self.lora_A[name])

    def factor_b(self, name: str) -> nn.Linear:
        """B of adapter `name`, [out, r] (with the LoRA bias, if any)."""
        return cast(nn.Linear, self.lora_B[name])

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool, init: str,
                    bias: bool = False, use_dora: bool = False) -> None:
        """Create adapter `name` of rank `r`; `init` is "default" (Kaiming A, zero B), "gaussian", or
        one of `inits.RESIDUAL_INITS` (pissa, olora); the data-driven ones (eva, loftq) start as "default" and are
        set later by `Method.initialise`.
        With `use_dora` it gets a magnitude m = ‖W + s·B A‖_row, so it starts as the same function as without."""
        weight = self.weight
        device, dtype = weight.device, weight.dtype if weight.is_floating_point() else torch.float32
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=bias, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        if weight.device.type != "meta":
            self._init_factors(name, r, init, bias)
        if use_dora:
            norm = torch.empty(self.out_features, device=device, dtype=dtype) if weight.device.type == "meta" else self._row_norm(name)
            self.lora_magnitude_vector[name] = nn.Parameter(norm.to(dtype))

    @torch.no_grad()
    def _init_factors(self, name: str, r: int, init: str, bias: bool) -> None:
        if init in RESIDUAL_INITS:
            self._init_residual(name, r, init)
            return
        if init == "gaussian":
            nn.init.normal_(self.factor_a(name).weight, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(self.factor_a(name).weight, a=math.sqrt(5))
        nn.init.zeros_(self.factor_b(name).weight)
        if bias:
            nn.init.zeros_(self.factor_b(name).bias)

    def _base_weight_fp32(self) -> torch.Tensor:
        """Base weight in fp32, in [out, in] layout whatever the module type."""
        w = self.weight.detach().float()
        return w.T if self.fan_in_fan_out else w

    def _set_base_weight(self, w_out_in: torch.Tensor) -> None:
        """Write an fp32 [out, in] weight back into the base layer, rounding once to its dtype."""
        w = w_out_in.T if self.fan_in_fan_out else w_out_in
        self.weight.data.copy_(w.to(self.weight.dtype))
        self.dora_norms.clear()

    def _init_residual(self, name: str, r: int, init: str) -> None:
        """PiSSA / OLoRA (`inits.py`): (A₀, B₀) from W, the base keeps W - s·B₀A₀, and (A₀, B₀) are kept in
        `residual_init` to export the adapter as a plain LoRA against the original W."""
        w = self._base_weight_fp32()
        a0, b0 = residual_factors(init, w, r, self.scaling[name])
        self.factor_a(name).weight.data.copy_(a0)
        self.factor_b(name).weight.data.copy_(b0)
        self._set_base_weight(w - self.scaling[name] * (b0 @ a0))
        self.residual_init[name] = (a0.clone(), b0.clone())

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A in fp32, in the base weight's own layout ([in, out] for Conv1D)."""
        a = self.factor_a(name).weight.detach().float()
        b = self.factor_b(name).weight.detach().float()
        delta = (b @ a) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def _row_norm(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """‖W + s·B A‖_row of adapter `name` in fp32 (detached), W the base weight unless `weight` is given."""
        w = self.weight if weight is None else weight
        return row_norm(w, self.fan_in_fan_out, self.factor_a(name).weight, self.factor_b(name).weight, self.scaling[name])

    def _rows(self, g: torch.Tensor) -> torch.Tensor:
        """A per-output-row vector shaped to broadcast over the base weight's own layout."""
        return g[None, :] if self.fan_in_fan_out else g[:, None]

    def _fold(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """The fp32 weight `w` (base layout, without this adapter) with adapter `name` folded in: W + s·B A, and
        for DoRA g ⊙_row (W + s·B A) with g = m / ‖W + s·B A‖_row (kept in `merge_scale` for unmerging)."""
        folded = w + self.delta_weight(name)
        if name not in self.lora_magnitude_vector:
            return folded
        g = self.lora_magnitude_vector[name].detach().float() / self._row_norm(name, w)
        self.merge_scale[name] = g
        return folded * self._rows(g)

    def merge(self) -> None:
        """Fold the active adapter into the base weight (and bias): W <- W + scaling * B A (DoRA: rescaled), once."""
        name = self.active_adapter
        if name is None or name in self.merged_adapters:
            return
        w = self.weight
        w.data.copy_(self._fold(name, w.detach().float()).to(w.dtype))
        self._merge_bias(name, sign=1.0)
        self.merged_adapters.append(name)
        self.dora_norms.clear()

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight again (exact in fp32, one rounding otherwise)."""
        w = self.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            unfolded = w.detach().float()
            if name in self.merge_scale:
                unfolded = unfolded / self._rows(self.merge_scale.pop(name))
            w.data.copy_((unfolded - self.delta_weight(name)).to(w.dtype))
            self._merge_bias(name, sign=-1.0)
        self.dora_norms.clear()

    def _merge_bias(self, name: str, sign: float) -> None:
        """Add (sign=1) or remove the LoRA bias (`lora_bias`, B's bias * scaling) to the base bias."""
        lora_bias = self.factor_b(name).bias
        if lora_bias is None:
            return
        base_bias = cast("torch.Tensor | None", self.base_layer.bias)  # nn.Linear's and Conv1D's bias
        if base_bias is None:
            raise PeftkitError("cannot merge a LoRA bias into a layer that has no bias")
        delta = sign * self.scaling[name] * lora_bias.detach().float()
        base_bias.data.copy_((base_bias.detach().float() + delta).to(base_bias.dtype))

    def unload(self, names: list[str]) -> nn.Module:
        """Return the base layer with the adapters `names` summed into it in fp32 and rounded once. A DoRA adapter
        rescales the whole weight, so it is no summand: it can only be folded in alone."""
        dora = [n for n in names if n in self.lora_magnitude_vector]
        if dora and len(names) > 1:
            raise PeftkitError(f"cannot fold DoRA adapter {dora[0]!r} together with {[n for n in names if n != dora[0]]}: "
                               "DoRA rescales the rows of W + ΔW, which is not a sum of deltas; merge one adapter "
                               "(merge(model, names=[...])) or delete the others first")
        w = self.weight
        total = w.detach().float()
        for name in names:
            total = self._fold(name, total)
        w.data.copy_(total.to(w.dtype))
        self.dora_norms.clear()
        for name in names:
            self._merge_bias(name, sign=1.0)
        return self.base_layer

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.dora_norms.clear(name)

    def train(self, mode: bool = True) -> LoraLayer:
        """Switch train / eval mode; the cached DoRA norms are dropped either way (a point where they are fresh)."""
        self.dora_norms.clear()
        return super().train(mode)

    def dora_norm(self, name: str) -> torch.Tensor:
        """‖W + s·B A‖_row for the forward: recomputed while training with gradients (A and B change every step),
        otherwise computed once and reused until W, A or B change (`dora.NormCache`)."""
        if self.training and torch.is_grad_enabled():
            return self._row_norm(name)
        w, a, b = self.weight, self.factor_a(name).weight, self.factor_b(name).weight
        key = NormCache.key((w, a, b), self.scaling[name])
        norm = self.dora_norms.get(name, key)
        if norm is None:
            norm = self._row_norm(name)
            self.dora_norms.put(name, key, norm)
        return norm

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """W x (+ b) + scaling * B(A(dropout(x))) (DoRA: `dora.dora_delta`), in the adapter's dtype, cast back."""
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if name is None or self.merged_adapters:
            return result
        lora_a, lora_b, dropout = self.factor_a(name), self.factor_b(name), self.lora_dropout[name]
        h = x.to(lora_a.weight.dtype)
        if name in self.lora_magnitude_vector:
            delta = dora_delta(h, result, base_layer=self.base_layer, fan_in_fan_out=self.fan_in_fan_out,
                               lora_a=lora_a, lora_b=lora_b, dropout=dropout, scaling=self.scaling[name],
                               magnitude=self.lora_magnitude_vector[name], norm=self.dora_norm(name),
                               training=self.training)
        else:
            delta = lora_b(lora_a(dropout(h))) * self.scaling[name]
        return result + delta.to(result.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={self.adapter_names()}"

"""The LoRA module: a frozen linear layer plus low-rank updates (Hu et al. 2021, arXiv:2106.09685).

    y = W x + b + scaling * B(A(dropout(x)))        A: [r, d_in], B: [d_out, r], scaling = alpha / r
                                                    (alpha / sqrt(r) with rsLoRA, Kalajdzic 2023)

B starts at zero, so an injected model equals its base until it trains. Works for `nn.Linear` (weight [out, in])
and GPT-2's `Conv1D` (weight [in, out], PEFT's `fan_in_fan_out`). Merging adds scaling * B @ A to W in fp32 and
rounds once to W's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftkit.core.method import AdapterLayer
from peftkit.errors import PeftkitError


class LoraLayer(AdapterLayer):
    """Wraps one linear layer (`base_layer`) and holds any number of named LoRA adapters for it."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # GPT-2 Conv1D stores W as [in, out]
        weight = base_layer.weight
        # nn.Linear's own sizes: a bitsandbytes 4-bit weight is stored packed, so its shape is not [out, in]
        self.out_features, self.in_features = (weight.shape[1], weight.shape[0]) if self.fan_in_fan_out else (base_layer.out_features, base_layer.in_features)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.pissa_init: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.merged_adapters: list[str] = []

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (so code that reads `module.weight` keeps working after injection)."""
        return self.base_layer.weight

    def add_adapter(
        self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool, init: str, bias: bool = False
    ) -> None:
        """Create adapter `name` of rank `r`; `init` is "default" (Kaiming A, zero B), "gaussian" or "pissa"."""
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=bias, **factory)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        if weight.device.type == "meta":
            return
        with torch.no_grad():
            if init == "pissa":
                self._init_pissa(name, r)
                return
            if init == "gaussian":
                nn.init.normal_(self.lora_A[name].weight, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)
            if bias:
                nn.init.zeros_(self.lora_B[name].bias)

    def _base_weight_fp32(self) -> torch.Tensor:
        """Base weight in fp32, in [out, in] layout whatever the module type."""
        w = self.base_layer.weight.detach().float()
        return w.T if self.fan_in_fan_out else w

    def _set_base_weight(self, w_out_in: torch.Tensor) -> None:
        """Write an fp32 [out, in] weight back into the base layer, rounding once to its dtype."""
        w = w_out_in.T if self.fan_in_fan_out else w_out_in
        self.base_layer.weight.data.copy_(w.to(self.base_layer.weight.dtype))

    def _init_pissa(self, name: str, r: int) -> None:
        """PiSSA (Meng et al. 2024): A, B from the top-r singular triplets; the base keeps the residual.

        With W = U S V^T: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T (`split_factors`), so s * B A = U_r S_r V_r^T, and
        W_res = W - s * B A. The initial (A0, B0) are kept to export the adapter as a plain LoRA later.
        """
        w = self._base_weight_fp32()
        if r > min(w.shape):
            raise PeftkitError(f"PiSSA rank {r} exceeds the smaller side of a {tuple(w.shape)} weight")
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        a0, b0 = split_factors(u[:, :r], s[:r], vh[:r], self.scaling[name])
        self.lora_A[name].weight.data.copy_(a0)
        self.lora_B[name].weight.data.copy_(b0)
        self._set_base_weight(w - self.scaling[name] * (b0 @ a0))
        self.pissa_init[name] = (a0.clone(), b0.clone())

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A in fp32, in the base weight's own layout ([in, out] for Conv1D)."""
        a = self.lora_A[name].weight.detach().float()
        b = self.lora_B[name].weight.detach().float()
        delta = (b @ a) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def merge(self) -> None:
        """Fold the active adapter into the base weight (and bias): W <- W + scaling * B A, once."""
        name = self.active_adapter
        if name is None or name in self.merged_adapters:
            return
        w = self.base_layer.weight
        w.data.copy_((w.detach().float() + self.delta_weight(name)).to(w.dtype))
        self._merge_bias(name, sign=1.0)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weight again (exact in fp32, one rounding otherwise)."""
        w = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            w.data.copy_((w.detach().float() - self.delta_weight(name)).to(w.dtype))
            self._merge_bias(name, sign=-1.0)

    def _merge_bias(self, name: str, sign: float) -> None:
        """Add (sign=1) or remove the LoRA bias (`lora_bias`, B's bias * scaling) to the base bias."""
        lora_bias = self.lora_B[name].bias
        if lora_bias is None:
            return
        base_bias = self.base_layer.bias
        if base_bias is None:
            raise PeftkitError("cannot merge a LoRA bias into a layer that has no bias")
        delta = sign * self.scaling[name] * lora_bias.detach().float()
        base_bias.data.copy_((base_bias.detach().float() + delta).to(base_bias.dtype))

    def unload(self, names: list[str]) -> nn.Module:
        """Return the base layer with the adapters `names` summed into it in fp32 and rounded once."""
        w = self.base_layer.weight
        total = w.detach().float()
        for name in names:
            total = total + self.delta_weight(name)
        w.data.copy_(total.to(w.dtype))
        for name in names:
            self._merge_bias(name, sign=1.0)
        return self.base_layer

    def set_active(self, name: str | None) -> None:
        """Switch the adapter used in forward; refused while an adapter is merged into the weight."""
        if self.merged_adapters and name not in self.merged_adapters:
            raise PeftkitError("unmerge the merged adapter (unmerge_adapter) before switching adapters")
        super().set_active(name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """W x (+ b) + scaling * B(A(dropout(x))), computed in the adapter's dtype and cast back."""
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if name is None or self.merged_adapters:
            return result
        lora_a = self.lora_A[name]
        h = x.to(lora_a.weight.dtype)
        delta = self.lora_B[name](lora_a(self.lora_dropout[name](h))) * self.scaling[name]
        return result + delta.to(result.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={self.adapter_names()}"


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A [r, n], B [m, r]) with scale·B·A = U diag(S) Vh, the root of S/scale on each side (balanced,
    as PiSSA does). Used by PiSSA's init and by every SVD that produces an adapter (combine, compress)."""
    root = torch.sqrt(s / scale)
    return root[:, None] * vh, u * root[None, :]

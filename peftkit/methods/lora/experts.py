"""LoRA on parameters named by `target_parameters` (PEFT's ParamWrapper): the fused 3-D expert weights of
mixture-of-experts layers (Qwen3-MoE, Mixtral, OLMoE, gpt-oss in transformers 5 keep every expert of a layer in one
`nn.Parameter`, `experts.gate_up_proj` [E, ...], `experts.down_proj` [E, ...], not in `nn.Linear`s) and 2-D weights
of modules that are no linear (a router's `gate.weight` [E, h]).

Each expert e has its own rank-r pair, stored stacked as PEFT stores them (so export and load are copies):

    A: [E r, d_in]   rows e r .. e r + r - 1 are A_e           (expert-major)
    B: [d_out, E r]  columns k E + e (k < r) are B_e           (rank-major: B reshaped [d_out, r, E])
    W_e <- W_e + scaling * B_e A_e      scaling = alpha / r (alpha / sqrt(r) with rsLoRA)

A weight [E, d_out, d_in] (F.linear's layout: Qwen3-MoE, Mixtral, OLMoE) gets B_e A_e; one the module marks
`is_transposed` ([E, d_in, d_out], gpt-oss) gets (B_e A_e)^T; a 2-D weight [d_out, d_in] is one expert. The forward
runs the wrapped module with the adapted weight in place of its parameter (`torch.func.functional_call`), so the
expert routing code is transformers' own: the whole W + ΔW of a layer is built once per forward (one batched
matmul) and kept for backward, exactly as PEFT's parametrization does. B starts at zero.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn
from torch.func import functional_call

from peftkit.core.method import AdapterLayer
from peftkit.errors import PeftkitError


def param_dims(owner: nn.Module, param: str) -> tuple[int, int, int]:
    """(experts, d_in, d_out) of `owner`'s parameter `param`: [E, d_out, d_in] (F.linear's layout), [E, d_in, d_out]
    when the module is marked `is_transposed` (transformers' flag; gpt-oss), or [d_out, d_in] (one expert)."""
    weight = cast(torch.Tensor, getattr(owner, param))
    if weight.ndim == 2:
        return 1, weight.shape[1], weight.shape[0]
    if weight.ndim != 3:
        raise PeftkitError(f"target_parameters takes 2-D or 3-D weights; {param!r} has shape {tuple(weight.shape)}")
    if getattr(owner, "is_transposed", False):
        return weight.shape[0], weight.shape[1], weight.shape[2]
    return weight.shape[0], weight.shape[2], weight.shape[1]


def pair_shapes(owner: nn.Module, param: str, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The shapes of (A, B) for rank `r` on `owner`'s parameter `param`: ([E r, d_in], [d_out, E r])."""
    experts, d_in, d_out = param_dims(owner, param)
    return (experts * r, d_in), (d_out, experts * r)


class ParamLoraLayer(AdapterLayer):
    """Wraps the module that owns targeted parameters (e.g. `mlp.experts`) and holds, per adapter, a LoRA pair for
    each of them: `lora_A[adapter][param]` [E r, d_in], `lora_B[adapter][param]` [d_out, E r] (module docstring)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.transposed = bool(getattr(base_layer, "is_transposed", False))  # transformers' flag for [E, in, out]
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, dict[str, float]] = {}

    def param_names(self) -> list[str]:
        """The targeted parameters in the wrapped module's registration order (the order PEFT nests its wrappers)."""
        targeted = {p for adapter in self.lora_A.values() for p in cast(nn.ParameterDict, adapter)}
        return [p for p, _ in self.base_layer.named_parameters(recurse=False) if p in targeted]

    def factors(self, name: str, param: str) -> tuple[nn.Parameter, nn.Parameter]:
        """(A [E r, d_in], B [d_out, E r]) of adapter `name` for parameter `param`."""
        a, b = cast(nn.ParameterDict, self.lora_A[name]), cast(nn.ParameterDict, self.lora_B[name])
        return a[param], b[param]

    def add_adapter(self, name: str, param: str, r: int, alpha: float, use_rslora: bool, init: str) -> None:
        """LoRA pair of rank `r` per expert for `param`: A Kaiming-uniform as nn.Linear's (init "gaussian": N(0, 1/r)),
        B zero, in the weight's dtype and device (uninitialised on the meta device)."""
        weight = cast(torch.Tensor, getattr(self.base_layer, param))
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        for store in (self.lora_A, self.lora_B):
            if name not in store:
                store[name] = nn.ParameterDict()
        a, b = (nn.Parameter(torch.empty(shape, device=weight.device, dtype=dtype))
                for shape in pair_shapes(self.base_layer, param, r))
        if weight.device.type != "meta":
            with torch.no_grad():
                if init == "gaussian":
                    nn.init.normal_(a, std=1.0 / r)
                else:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)
        cast(nn.ParameterDict, self.lora_A[name])[param] = a
        cast(nn.ParameterDict, self.lora_B[name])[param] = b
        self.scaling.setdefault(name, {})[param] = alpha / math.sqrt(r) if use_rslora else alpha / r

    def _pair(self, name: str, param: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs) with ΔW = scaling * lhs @ rhs in the weight's own layout: [E, out, r] @ [E, r, in], or the
        transposes for an `is_transposed` weight; 2-D weights: B [out, r] @ A [r, in]."""
        a, b = self.factors(name, param)
        experts, d_in, d_out = param_dims(self.base_layer, param)
        if cast(torch.Tensor, getattr(self.base_layer, param)).ndim == 2:
            return b.to(dtype), a.to(dtype)
        a_e = a.reshape(experts, -1, d_in)  # [E, r, in]
        b_e = b.reshape(d_out, -1, experts).permute(2, 0, 1)  # [E, out, r]
        lhs, rhs = (a_e.transpose(-2, -1), b_e.transpose(-2, -1)) if self.transposed else (b_e, a_e)
        return lhs.to(dtype), rhs.to(dtype)

    def adapted(self, name: str, param: str) -> torch.Tensor:
        """W + ΔW of adapter `name` in W's dtype, differentiable in A and B (autocast off: a parametrized weight
        keeps its dtype, as in PEFT)."""
        w = cast(torch.Tensor, getattr(self.base_layer, param))
        lhs, rhs = self._pair(name, param, w.dtype)
        scale = self.scaling[name][param]
        with torch.autocast(device_type=w.device.type, enabled=False):
            return torch.baddbmm(w, lhs, rhs, alpha=scale) if w.ndim == 3 else w + lhs @ rhs * scale

    def delta_weight(self, name: str, param: str) -> torch.Tensor:
        """scaling * ΔW in fp32 in the weight's layout (detached): what merging adds."""
        lhs, rhs = self._pair(name, param, torch.float32)
        return (lhs.detach() @ rhs.detach()) * self.scaling[name][param]

    def _add(self, name: str, sign: float) -> None:
        """W <- W + sign * ΔW for every parameter adapter `name` holds, in fp32, rounded once to W's dtype."""
        for param in cast(nn.ParameterDict, self.lora_A[name]):
            w = cast(torch.Tensor, getattr(self.base_layer, param))
            w.data.copy_((w.detach().float() + sign * self.delta_weight(name, param)).to(w.dtype))

    def merge(self) -> None:
        """Fold the active adapter into the wrapped weights, once."""
        name = self.active_adapter
        if name is None or name in self.merged_adapters:
            return
        self._add(name, 1.0)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take every merged adapter out of the weights again."""
        while self.merged_adapters:
            self._add(self.merged_adapters.pop(), -1.0)

    def unload(self, names: list[str]) -> nn.Module:
        """The wrapped module with adapters `names` added into its weights."""
        for name in names:
            self._add(name, 1.0)
        return self.base_layer

    def forward(self, *args, **kwargs):
        """The wrapped module's forward with each targeted weight replaced by W + ΔW of the active adapter."""
        name = self.active_adapter
        if name is None or self.merged_adapters:
            return self.base_layer(*args, **kwargs)
        weights = {param: self.adapted(name, param) for param in cast(nn.ParameterDict, self.lora_A[name])}
        return functional_call(self.base_layer, weights, args, kwargs, strict=False)

    def extra_repr(self) -> str:
        return f"parameters={self.param_names()}, adapters={self.adapter_names()}"

"""The bottleneck adapter module and the layer that wraps an attention block or MLP with it.

A bottleneck adapter (Houlsby et al. 2019, arXiv:1902.00751) is a small two-layer MLP, d -> m -> d:

    A(h) = W_up f(W_down dropout(h) + b_down) + b_up         W_down: [m, d], W_up: [d, m], m = d // reduction_factor

Trainable parameters per adapter: d*m + m (down) + m*d + d (up) = 2*d*m + m + d. W_up and b_up start at zero, so
A(h) = 0 and the model equals its base until it trains.

How A is wired around a sublayer F (an attention block or an MLP), before the decoder layer's own residual add:

    sequential (Houlsby; Pfeiffer et al. 2020, arXiv:2005.00247):   y = F(x) + A(F(x))
    parallel   (He et al. 2021, arXiv:2110.04366):                   y = F(x) + s * A(x)
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from peftkit.core.method import AdapterLayer

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """d -> m -> d with a non-linearity in between; the up-projection starts at zero."""

    def __init__(self, d: int, m: int, activation: str, dropout: float, factory: dict) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(d, m, **factory)
        self.activation = ACTIVATIONS[activation]()
        self.adapter_up = nn.Linear(m, d, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if factory["device"].type != "meta":
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(self.activation(self.adapter_down(self.dropout(h))))


class BottleneckLayer(AdapterLayer):
    """Wraps one sublayer (`base_layer`: attention or MLP) and holds its named bottleneck adapters."""

    def __init__(self, base_layer: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.hidden_size = hidden_size
        self.adapters = nn.ModuleDict()
        self.parallel: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}

    def add_adapter(
        self, name: str, m: int, activation: str, dropout: float, parallel: bool, scaling: float, factory: dict
    ) -> None:
        """Create adapter `name` with bottleneck size m."""
        self.adapters[name] = Bottleneck(self.hidden_size, m, activation, dropout, factory)
        self.parallel[name] = parallel
        self.scaling[name] = scaling

    def adapter(self, name: str) -> Bottleneck:
        """Adapter `name` (`adapters` is a ModuleDict: its items are typed as plain modules)."""
        return cast(Bottleneck, self.adapters[name])

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.parallel.pop(name, None)
        self.scaling.pop(name, None)

    def unload(self, names: list[str]) -> nn.Module | None:
        """Put the wrapped sublayer back (adapters `names` cannot be folded into it: they are non-linear)."""
        super().unload(names)
        return self.base_layer

    def __getattr__(self, name: str) -> Any:
        """Attributes the model reads off the sublayer (layer_idx, is_causal, ...) still resolve after wrapping."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            if name.startswith("__") or "base_layer" not in modules:  # (during copy / unpickling)
                raise
            return getattr(modules["base_layer"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """F(x) plus the active adapter; attention blocks return (output, weights, ...): only output changes."""
        result = self.base_layer(*args, **kwargs)
        name = self.active_adapter
        if name is None:
            return result
        out = result[0] if isinstance(result, tuple) else result
        adapter = cast(Bottleneck, self.adapters[name])  # `adapters` holds only what add_adapter made
        dtype = adapter.adapter_down.weight.dtype
        if self.parallel[name]:
            x = args[0] if args else kwargs["hidden_states"]  # decoder layers call attention with hidden_states=
            delta = self.scaling[name] * adapter(x.to(dtype))
        else:
            delta = self.scaling[name] * adapter(out.to(dtype))
        out = out + delta.to(out.dtype)
        return (out, *result[1:]) if isinstance(result, tuple) else out

    def extra_repr(self) -> str:
        return f"d={self.hidden_size}, adapters={self.adapter_names()}"

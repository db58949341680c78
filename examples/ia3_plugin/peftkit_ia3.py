"""IA3 (Liu et al. 2022, arXiv:2205.05638) as a peftkit method plugin, in HF PEFT 0.21.2's format both ways.

IA3 learns one scaling vector per adapted linear layer and nothing else:

    attention (k_proj, v_proj):  y = (W x + b) * l      l: [d_out, 1], scales the output
    feed-forward (down_proj):    y = W (x * l) + b      l: [1, d_in],  scales the input

Every vector starts at ones, so an injected model equals its base until it trains. Merging folds l into W (rows for
an output vector, columns for an input one, and the bias for an output vector), exactly as PEFT's merge does.
On disk: peft_type "IA3", tensors `base_model.model.<module path>.ia3_l`, and `target_modules` /
`feedforward_modules` as PEFT writes them, so HF PEFT loads what this saves and this loads what PEFT saves.

A plugin imports only `peftkit.core` and `peftkit.errors`, like a built-in method. The registry finds it through the
entry point in pyproject.toml; the `Method` hooks (see docs/architecture.md) tell the trainer, adapter I/O and the
memory estimator all they need, so nothing in peftkit names "ia3".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.archs import LINEAR_TYPES
from peftkit.core.inject import base_modules, find_targets, inject, matches, replace_module
from peftkit.core.method import PEFT_PREFIX, AdapterLayer, Method
from peftkit.core.shapes import ModelShape, SavedActivations
from peftkit.core.state import adapters
from peftkit.errors import PeftkitError

# PEFT's defaults (peft/utils/constants.py), by model_type: the targets, and which of them scale their input.
DEFAULT_TARGETS = {"llama": ("k_proj", "v_proj", "down_proj"), "mistral": ("k_proj", "v_proj", "down_proj"),
                   "qwen2": ("q_proj", "v_proj", "down_proj"), "gemma": ("q_proj", "v_proj", "down_proj")}
DEFAULT_FEEDFORWARD = ("down_proj",)


@dataclass(frozen=True)
class IA3Config:
    """IA3's options, named as in PEFT's IA3Config. None takes PEFT's default for the model_type. target_modules
    and feedforward_modules: module names (suffix match), a regex of the full path, or "all-linear" (targets)."""

    target_modules: tuple[str, ...] | str | None = None
    feedforward_modules: tuple[str, ...] | str | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        for field in ("target_modules", "feedforward_modules"):
            value = getattr(self, field)
            if isinstance(value, str) and "," in value:  # `--target-modules k_proj,v_proj`
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            object.__setattr__(self, field, tuple(value) if isinstance(value, (list, set)) else value)
        if not isinstance(self.init_ia3_weights, bool):
            raise PeftkitError(f"init_ia3_weights must be true or false, got {self.init_ia3_weights!r}")

    def resolved(self, model_type: str) -> tuple[tuple[str, ...] | str, tuple[str, ...] | str]:
        """(targets, feedforward) with PEFT's defaults for `model_type` filled in."""
        targets = self.target_modules if self.target_modules is not None else DEFAULT_TARGETS.get(model_type)
        if targets is None:
            raise PeftkitError(f"ia3 has no default target modules for model_type {model_type!r}; pass "
                               "--target-modules (and --set feedforward_modules=...)")
        feedforward = self.feedforward_modules if self.feedforward_modules is not None else DEFAULT_FEEDFORWARD
        return targets, feedforward


class IA3Layer(AdapterLayer):
    """Wraps one linear layer (`base_layer`) and holds its IA3 vectors, one per adapter name, in `ia3_l`."""

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # GPT-2's Conv1D stores W as [in, out]
        d_in, d_out = base_layer.weight.shape[::-1] if not self.fan_in_fan_out else base_layer.weight.shape
        self.vector_shape = (1, d_in) if is_feedforward else (d_out, 1)
        self.ia3_l = nn.ParameterDict()

    def add_adapter(self, name: str, init_ones: bool) -> None:
        """A new vector for adapter `name`: ones (the identity), or N(0, 1) without `init_ones` (as PEFT)."""
        weight = self.base_layer.weight
        make = torch.ones if init_ones else torch.randn
        self.ia3_l[name] = nn.Parameter(make(self.vector_shape, device=weight.device, dtype=weight.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self.active_adapter
        if name is None or self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        scale = self.ia3_l[name].flatten()
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        return (out * scale).to(out.dtype)

    def _fold(self, name: str, inverse: bool) -> None:
        """Multiply (or divide back) the base weight, and an output vector's bias, by adapter `name`'s vector."""
        vector = self.ia3_l[name].data
        weight, bias = self.base_layer.weight, self.base_layer.bias
        scale = vector.T if self.fan_in_fan_out else vector  # PEFT's transpose(ia3_l, fan_in_fan_out)
        op = torch.div if inverse else torch.mul
        eps = 1e-8 if inverse else 0.0  # PEFT's tolerance against division by zero
        weight.data = op(weight.data, scale + eps).to(weight.dtype)
        if not self.is_feedforward and bias is not None:
            bias.data = op(bias.data, vector.reshape(bias.shape) + eps).to(bias.dtype)

    def merge(self) -> None:
        if self.active_adapter is not None and not self.merged_adapters:
            self._fold(self.active_adapter, inverse=False)
            self.merged_adapters.append(self.active_adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._fold(self.merged_adapters.pop(), inverse=True)

    def unload(self, names: list[str]) -> nn.Module:
        for name in names:
            self._fold(name, inverse=False)
        return self.base_layer


class IA3Method(Method):
    """Registry entry for IA3 (`peftkit train --method ia3`), found through the `peftkit.methods` entry point."""

    name = "ia3"
    peft_type = "IA3"
    config_cls = IA3Config
    mergeable = True
    default_lr = 3e-3  # a vector per layer learns slowly at LoRA's 2e-4; the IA3 paper trains at 3e-3

    def inject(self, model: nn.Module, config: IA3Config, adapter_name: str) -> None:
        """Wrap every targeted linear in an IA3Layer (or reuse it) and add the adapter's vector."""
        targets, feedforward = config.resolved(model.config.model_type)
        for path in find_targets(model, targets):
            module = model.get_submodule(path)
            if not isinstance(module, IA3Layer):
                module = IA3Layer(module, is_feedforward=matches(path, feedforward))
                replace_module(model, path, module)
            module.add_adapter(adapter_name, config.init_ia3_weights)

    def export(self, model: nn.Module, adapter_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """PEFT's IA3 layout: one `ia3_l` tensor per adapted module; target names as PEFT writes them."""
        layers = [(p, m) for p, m in base_modules(model) if isinstance(m, IA3Layer) and adapter_name in m.ia3_l]
        tensors = {f"{PEFT_PREFIX}{p}.ia3_l": m.ia3_l[adapter_name].detach().contiguous() for p, m in layers}
        paths = [p for p, _ in layers]
        config_json = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "inference_mode": True,
                       "target_modules": _names_or_regex(model, paths),
                       "feedforward_modules": _names_or_regex(model, [p for p, m in layers if m.is_feedforward]),
                       "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers),
                       "init_ia3_weights": adapters(model)[adapter_name].config.init_ia3_weights,
                       "modules_to_save": None, "exclude_modules": None}
        return config_json, tensors

    def load(self, model: nn.Module, config_json: dict, tensors: dict[str, torch.Tensor], adapter_name: str) -> IA3Config:
        """Inject an IA3 adapter saved by peftkit or HF PEFT and copy its vectors in (names and shapes checked)."""
        config = IA3Config(target_modules=config_json.get("target_modules"),
                           feedforward_modules=config_json.get("feedforward_modules") or ())
        inject(model, config, adapter_name)
        layers = {f"{PEFT_PREFIX}{p}.ia3_l": m for p, m in base_modules(model) if isinstance(m, IA3Layer)}
        for key in sorted(set(tensors) ^ set(layers)):
            what = "is not a module of this model" if key in tensors else "is missing from the file"
            raise PeftkitError(f"IA3 tensor {key!r} {what} (was the adapter trained for another base model?)")
        with torch.no_grad():
            for key, layer in layers.items():
                if tuple(tensors[key].shape) != layer.vector_shape:
                    raise PeftkitError(f"IA3 tensor {key!r} has shape {tuple(tensors[key].shape)}, the model needs "
                                       f"{layer.vector_shape}")
                layer.ia3_l[adapter_name].copy_(tensors[key])
        return config

    def saved_activations(self, config: IA3Config, shape: ModelShape, act_bytes: int, seq_len: int) -> SavedActivations:
        """What the products save for l's gradient: an output-scaled linear's output (a d_out), an input-scaled
        one's input (a d_in), bytes per token per layer."""
        targets, feedforward = config.resolved(shape.model_type)
        saved = 0
        for name in shape.target_linears(targets):
            linear = shape.linear(name)
            saved += act_bytes * (linear.d_in if matches(name, feedforward) else linear.d_out)
        return SavedActivations(per_layer=saved)


def _names_or_regex(model: nn.Module, paths: list[str]) -> list[str] | str:
    """Module names when every linear of those names is in `paths` (PEFT's usual form), else a regex of the paths."""
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    covered = {p for p, m in base_modules(model) if p.rsplit(".", 1)[-1] in names
               and isinstance(getattr(m, "base_layer", m), LINEAR_TYPES)}
    return names if covered == set(paths) else "^(" + "|".join(re.escape(p) for p in paths) + ")$"

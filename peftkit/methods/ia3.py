"""IA3 (Liu et al. 2022, arXiv:2205.05638), in HF PEFT 0.21.2's format both ways (`--method ia3`).

IA3 learns one scaling vector per adapted linear layer and nothing else:

    attention (k_proj, v_proj):  y = (W x + b) * l      l: [d_out, 1], scales the output
    feed-forward (down_proj):    y = W (x * l) + b      l: [1, d_in],  scales the input

Every vector starts at ones, so an injected model equals its base until it trains. Merging folds l into W (rows for
an output vector, columns for an input one, and the bias for an output vector), exactly as PEFT's merge does, and
unmerging divides it back out. Trainable parameters: d_out per output-scaled layer, d_in per input-scaled one.

Defaults per model_type are PEFT's (TRANSFORMERS_MODELS_TO_IA3_*_MAPPING). A module is feed-forward when its path
ends with one of `feedforward_modules` (PEFT's plain `str.endswith`), or fully matches it when it is a regex.
On disk: peft_type "IA3", tensors `base_model.model.<module path>.ia3_l`, `target_modules` / `feedforward_modules`.

Saved for backward, bytes per token per layer (a: bytes of the compute dtype): an output-scaled linear's output
(a d_out) and an input-scaled one's input, made fp32 by the product with the fp32 vector under amp (4 d_in).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from peftkit.core.inject import (
    base_modules,
    find_targets,
    inject,
    refuse_unsupported_fields,
    replace_module,
    saved_targets,
)
from peftkit.core.method import PEFT_PREFIX, AdapterLayer, Method, copy_saved_tensors
from peftkit.core.registry import register
from peftkit.core.shapes import ModelShape, SavedActivations
from peftkit.core.state import adapters
from peftkit.errors import PeftkitError
from peftkit.methods.lora.config import normalize_targets

_LLAMA_LIKE = (("k_proj", "v_proj", "down_proj"), ("down_proj",))
_QV_DOWN = (("q_proj", "v_proj", "down_proj"), ("down_proj",))
# PEFT's defaults by model_type: (target_modules, feedforward_modules).
DEFAULTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "mixtral": (("k_proj", "v_proj", "w2"), ("w2",)),
    "qwen2": _QV_DOWN, "qwen3": _QV_DOWN, "gemma": _QV_DOWN, "gemma2": _QV_DOWN, "gemma3_text": _QV_DOWN,
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
}


@dataclass(frozen=True)
class IA3Config:
    """IA3's options, named as in PEFT's IA3Config. None takes PEFT's default for the model_type. target_modules:
    module names (suffix match), a regex of the full path, or "all-linear"; feedforward_modules: the targets that
    scale their input (path suffixes, or a regex), a subset of target_modules when both are lists (as PEFT checks).
    init_ia3_weights: vectors start at ones (False: N(0, 1), as PEFT)."""

    target_modules: tuple[str, ...] | str | None = None
    feedforward_modules: tuple[str, ...] | str | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        for field in ("target_modules", "feedforward_modules"):
            object.__setattr__(self, field, normalize_targets(getattr(self, field), field))
        if not isinstance(self.init_ia3_weights, bool):
            raise PeftkitError(f"init_ia3_weights must be true or false, got {self.init_ia3_weights!r}")
        targets, feedforward = self.target_modules, self.feedforward_modules
        if isinstance(targets, tuple) and isinstance(feedforward, tuple) and not set(feedforward) <= set(targets):
            raise PeftkitError(f"feedforward_modules {sorted(set(feedforward) - set(targets))} are not in "
                               f"target_modules {list(targets)}; list them there too")

    def resolved(self, model_type: str) -> tuple[tuple[str, ...] | str, tuple[str, ...] | str]:
        """(targets, feedforward) with PEFT's defaults for `model_type` filled in."""
        defaults = DEFAULTS.get(model_type)
        if defaults is None and (self.target_modules is None or self.feedforward_modules is None):
            raise PeftkitError(f"ia3 has no default modules for model_type {model_type!r}; pass --target-modules "
                               "and --set feedforward_modules=... (the targets that scale their input)")
        targets = self.target_modules if self.target_modules is not None else defaults[0]  # type: ignore[index]
        feedforward = self.feedforward_modules if self.feedforward_modules is not None else defaults[1]  # type: ignore[index]
        return targets, feedforward


def is_feedforward(path: str, feedforward: Sequence[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole path, a list entry be a plain suffix of it."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, path) is not None
    return any(path.endswith(name) for name in feedforward)


def model_type(model: nn.Module) -> str:
    """The model's `config.model_type` ("" without one)."""
    return str(getattr(getattr(model, "config", None), "model_type", ""))


class IA3Layer(AdapterLayer):
    """Wraps one linear layer (`base_layer`) and holds its IA3 vectors, one per adapter name, in `ia3_l`."""

    def __init__(self, base_layer: nn.Module, feedforward: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.is_feedforward = feedforward
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # GPT-2's Conv1D stores W as [in, out]
        d_out, d_in = self.weight.shape[::-1] if self.fan_in_fan_out else self.weight.shape
        self.vector_shape = (1, d_in) if feedforward else (d_out, 1)
        self.ia3_l = nn.ParameterDict()

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (`nn.Module.__getattr__` types it as `Tensor | Module`)."""
        return cast(torch.Tensor, self.base_layer.weight)

    def add_adapter(self, name: str, init_ones: bool) -> None:
        """A new vector for adapter `name`: ones (the identity), or N(0, 1) without `init_ones` (as PEFT)."""
        weight = self.weight
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
        weight, bias = self.weight, cast(torch.Tensor | None, self.base_layer.bias)
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
    """Registry entry for IA3 (`peftkit train --method ia3`)."""

    name = "ia3"
    peft_type = "IA3"
    config_cls = IA3Config
    mergeable = True
    option_fields = {"target_modules": "target_modules"}
    default_lr = 3e-3  # a vector per layer learns slowly at LoRA's 2e-4; the IA3 paper trains at 3e-3

    def inject(self, model: nn.Module, config: IA3Config, adapter_name: str) -> None:
        """Wrap every targeted linear in an IA3Layer (or reuse it) and add the adapter's vector."""
        targets, feedforward = config.resolved(model_type(model))
        for path in find_targets(model, targets):
            module = model.get_submodule(path)
            if not isinstance(module, IA3Layer):
                module = IA3Layer(module, is_feedforward(path, feedforward))
                replace_module(model, path, module)
            module.add_adapter(adapter_name, config.init_ia3_weights)

    def export(self, model: nn.Module, adapter_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """PEFT's IA3 layout: one `ia3_l` tensor per adapted module; targets as PEFT re-creates exactly them."""
        config: IA3Config = adapters(model)[adapter_name].config
        targets, feedforward = config.resolved(model_type(model))
        layers = [(p, m) for p, m in base_modules(model) if isinstance(m, IA3Layer) and adapter_name in m.ia3_l]
        tensors = {f"{PEFT_PREFIX}{p}.ia3_l": m.ia3_l[adapter_name].detach().contiguous() for p, m in layers}
        paths = [p for p, _ in layers]
        fed = [p for p, m in layers if m.is_feedforward]
        config_json = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "inference_mode": True,
                       "target_modules": saved_targets(model, paths, targets),
                       "feedforward_modules": _saved_feedforward(paths, fed, feedforward),
                       "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers),
                       "init_ia3_weights": config.init_ia3_weights, "modules_to_save": None, "exclude_modules": None}
        return config_json, tensors

    def load(self, model: nn.Module, config_json: dict, tensors: dict[str, torch.Tensor], adapter_name: str) -> IA3Config:
        """Inject an IA3 adapter saved by peftkit or HF PEFT and copy its vectors in (names and shapes checked)."""
        refuse_unsupported_fields(config_json, self.peft_type or self.name)
        config = IA3Config(target_modules=config_json.get("target_modules"),
                           feedforward_modules=config_json.get("feedforward_modules") or ())
        inject(model, config, adapter_name)
        wanted = {f"{PEFT_PREFIX}{p}.ia3_l": m.ia3_l[adapter_name] for p, m in base_modules(model)
                  if isinstance(m, IA3Layer) and adapter_name in m.ia3_l}
        copy_saved_tensors("IA3", wanted, tensors)
        return config

    def saved_activations(self, config: IA3Config, shape: ModelShape, act_bytes: int, seq_len: int) -> SavedActivations:
        """What the products save for l's gradient, bytes per token per layer (module docstring)."""
        targets, feedforward = config.resolved(shape.model_type)
        saved = 0
        for name in shape.target_linears(targets):
            linear = shape.linear(name)
            saved += 4 * linear.d_in if is_feedforward(name, feedforward) else act_bytes * linear.d_out
        return SavedActivations(per_layer=saved)


def _saved_feedforward(paths: list[str], fed: list[str], feedforward: Sequence[str] | str) -> list[str] | str:
    """`feedforward_modules` for adapter_config.json: the config's own spec when it picks exactly `fed` among the
    adapted `paths` (PEFT's rule), else a regex of those paths."""
    if {p for p in paths if is_feedforward(p, feedforward)} == set(fed):
        return feedforward if isinstance(feedforward, str) else list(feedforward)
    return "^(" + "|".join(re.escape(p) for p in fed) + ")$"


register(IA3Method())

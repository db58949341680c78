"""LayerNorm tuning (Zhao et al. 2023, arXiv:2312.11420) as a peftkit method plugin, in HF PEFT 0.21.2's LN_TUNING
format both ways.

It trains the model's normalization layers and nothing else: each targeted norm is wrapped, and the adapter is a
trainable copy of it (weight, and bias where the norm has one) that runs in its place:

    y = norm_adapter(x)      norm_adapter: a copy of the norm, made when the adapter is added (so it starts equal)

Merging swaps the tuned copy in for the original, as PEFT's merge does; unmerging swaps it back. Defaults per
model_type are PEFT's (TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING). On disk: peft_type "LN_TUNING",
tensors `base_model.model.<norm path>.ln_tuning_layers.<weight | bias>`, and `target_modules`.

A plugin imports only `peftkit.core` and `peftkit.errors`, like a built-in method. The registry finds it through the
entry point in pyproject.toml; the `Method` hooks (see docs/architecture.md) tell the trainer, adapter I/O and the
memory estimator all they need, so nothing in peftkit names "ln_tuning".
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.inject import base_modules, find_targets, inject, replace_module, saved_targets
from peftkit.core.method import PEFT_PREFIX, AdapterLayer, Method, copy_saved_tensors
from peftkit.core.shapes import ModelShape, SavedActivations
from peftkit.core.state import adapters
from peftkit.errors import PeftkitError

_LLAMA_LIKE = ("input_layernorm", "post_attention_layernorm", "norm")
DEFAULT_TARGETS = {"llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "gemma": _LLAMA_LIKE, "gpt2": ("ln_1", "ln_2", "ln_f")}


@dataclass(frozen=True)
class LNTuningConfig:
    """LN tuning's one option, named as in PEFT's LNTuningConfig: target_modules, the norms to train (module names,
    suffix match, or a regex of the full path); None takes PEFT's default for the model_type."""

    target_modules: tuple[str, ...] | str | None = None

    def __post_init__(self) -> None:
        value = self.target_modules
        if isinstance(value, str) and "," in value:  # `--target-modules ln_1,ln_2`
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        object.__setattr__(self, "target_modules", tuple(value) if isinstance(value, (list, set)) else value)

    def resolved(self, model_type: str) -> tuple[str, ...] | str:
        """The targets, PEFT's defaults for `model_type` filled in."""
        targets = self.target_modules if self.target_modules is not None else DEFAULT_TARGETS.get(model_type)
        if targets is None:
            raise PeftkitError(f"ln_tuning has no default norms for model_type {model_type!r}; pass --target-modules")
        return targets


class LNTuningLayer(AdapterLayer):
    """Wraps one norm (`base_layer`) and holds one trainable copy of it per adapter name, in `ln_tuning_layers`."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ln_tuning_layers = nn.ModuleDict()

    def add_adapter(self, name: str) -> None:
        """Adapter `name`: a copy of the norm as it is now (the base's own, not a merged one)."""
        self.ln_tuning_layers[name] = copy.deepcopy(self.base_layer)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self.active_adapter
        if name is None or self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        return self.ln_tuning_layers[name](x, *args, **kwargs)

    def _swap(self, name: str) -> None:
        self.base_layer, self.ln_tuning_layers[name] = self.ln_tuning_layers[name], self.base_layer

    def merge(self) -> None:
        if self.active_adapter is not None and not self.merged_adapters:
            self._swap(self.active_adapter)
            self.merged_adapters.append(self.active_adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._swap(self.merged_adapters.pop())

    def unload(self, names: list[str]) -> nn.Module:
        if len(names) > 1:
            raise PeftkitError(f"LN tuning replaces a norm by one adapter's copy; cannot fold {names} together")
        return self.ln_tuning_layers[names[0]] if names else self.base_layer


class LNTuningMethod(Method):
    """Registry entry for LN tuning (`peftkit train --method ln_tuning`), found through the `peftkit.methods` entry
    point."""

    name = "ln_tuning"
    peft_type = "LN_TUNING"
    config_cls = LNTuningConfig
    mergeable = True
    option_fields = {"target_modules": "target_modules"}
    default_lr = 1e-3  # a few thousand weights that scale every hidden state: between LoRA's 2e-4 and IA3's

    def inject(self, model: nn.Module, config: LNTuningConfig, adapter_name: str) -> None:
        """Wrap every targeted norm in an LNTuningLayer (or reuse it) and add the adapter's copy."""
        targets = config.resolved(model.config.model_type)
        for path in find_targets(model, targets, kinds=(nn.Module,)):  # PEFT takes any module type
            module = model.get_submodule(path)
            if not isinstance(module, LNTuningLayer):
                module = LNTuningLayer(module)
                replace_module(model, path, module)
            module.add_adapter(adapter_name)

    def export(self, model: nn.Module, adapter_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """PEFT's LN_TUNING layout: each copy's parameters under `<norm path>.ln_tuning_layers.`."""
        layers = _layers(model, adapter_name)
        tensors = {f"{PEFT_PREFIX}{path}.ln_tuning_layers.{key}": value.detach().contiguous()
                   for path, layer in layers for key, value in layer.ln_tuning_layers[adapter_name].state_dict().items()}
        paths = [p for p, _ in layers]
        config_json = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "inference_mode": True,
                       "target_modules": saved_targets(model, paths, adapters(model)[adapter_name].config.target_modules),
                       "modules_to_save": None, "exclude_modules": None}
        return config_json, tensors

    def load(self, model: nn.Module, config_json: dict, tensors: dict[str, torch.Tensor],
             adapter_name: str) -> LNTuningConfig:
        """Inject an LN tuning adapter saved by peftkit or HF PEFT and load each copy's tensors (names and shapes
        checked)."""
        config = LNTuningConfig(target_modules=config_json.get("target_modules"))
        inject(model, config, adapter_name)
        wanted = {f"{PEFT_PREFIX}{path}.ln_tuning_layers.{key}": value for path, layer in _layers(model, adapter_name)
                  for key, value in layer.ln_tuning_layers[adapter_name].state_dict().items()}
        copy_saved_tensors("LN tuning", wanted, tensors)
        return config

    def saved_activations(self, config: LNTuningConfig, shape: ModelShape, act_bytes: int,
                          seq_len: int) -> SavedActivations:
        """The normalized input each trained norm's weight multiplies (its gradient needs it): a h per token for the
        two norms of every layer, and once for the final norm (the default targets; this example models no other)."""
        return SavedActivations(per_layer=2 * act_bytes * shape.hidden, once=act_bytes * shape.hidden)


def _layers(model: nn.Module, adapter_name: str) -> list[tuple[str, LNTuningLayer]]:
    return [(p, m) for p, m in base_modules(model) if isinstance(m, LNTuningLayer) and adapter_name in m.ln_tuning_layers]

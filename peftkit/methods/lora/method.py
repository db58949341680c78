"""LoRA's registry entry: injection and PEFT-format export / load. The module itself is in `layer.py`, the format
in `format.py`.

Trainable parameters: r * (d_in + d_out) per adapted matrix (plus d_out with `lora_bias`, or DoRA's magnitude).

Saved for backward, bytes per token per layer (a: bytes of the compute dtype): each adapted linear's input, once per
distinct input (q / k / v share theirs: a h; gate / up theirs: a h; down_proj's: a i), and each A's output (a r).
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import torch
from torch import nn

from peftkit.core.archs import LINEAR_TYPES
from peftkit.core.inject import base_modules, find_targets, inject, replace_module
from peftkit.core.method import InitData, Method
from peftkit.core.registry import register
from peftkit.core.shapes import ModelShape, SavedActivations
from peftkit.core.state import adapters
from peftkit.errors import PeftkitError
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.eva import initialise_eva
from peftkit.methods.lora.format import (
    config_from_peft,
    load_lora_tensors,
    lora_tensors,
    peft_lora_config,
    saved_module_names,
)
from peftkit.methods.lora.inits import RESIDUAL_INITS
from peftkit.methods.lora.layer import LoraLayer
from peftkit.methods.lora.param_targets import (
    check_param_shapes,
    exported_names,
    inject_parameters,
    load_param_tensors,
    param_saved,
    param_tensors,
    split_param_tensors,
)
from peftkit.methods.lora.saved import export_saved, load_saved_modules, split_saved


class LoraMethod(Method):
    """Registry entry for LoRA (`--method lora`)."""

    name = "lora"
    peft_type = "LORA"
    config_cls = LoraConfig
    mergeable = True
    option_fields = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
                     "target_parameters": "target_parameters", "init": "init"}

    def inject(self, model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
        """Wrap every targeted linear layer in a LoraLayer (or add to an existing one) with a new adapter, and every
        module owning a targeted parameter in a ParamLoraLayer (`experts.py`)."""
        if config.target_parameters:
            inject_parameters(model, config, adapter_name)
        linears = [] if config.target_modules == () else find_targets(model, config.target_modules,
                                                                     config.layers_to_transform)
        for path in linears:
            module = model.get_submodule(path)
            if not isinstance(module, LoraLayer):
                module = LoraLayer(module)
                replace_module(model, path, module)
            r, alpha = config.rank_alpha(path)
            module.add_adapter(adapter_name, r, alpha, config.lora_dropout, config.use_rslora, config.init,
                               config.lora_bias, config.use_dora)

    def peft_refusal(self, config_json: dict) -> str | None:
        """PEFT's LoraConfig takes `target_parameters` only as a list (a string is a TypeError when it loads)."""
        names = config_json.get("target_parameters")
        if names is not None and not isinstance(names, list):
            return f"target_parameters is {names!r}: PEFT needs a list of parameter names (a string is a TypeError)"
        return super().peft_refusal(config_json)

    def initialise(self, model: nn.Module, config: LoraConfig, adapter_name: str, data: InitData) -> None:
        """`--init eva`: A (and the ranks) from the training data's layer inputs (`eva.py`); other inits: nothing."""
        if config.init == "eva":
            initialise_eva(model, config, adapter_name, data.batches)

    def export(self, model: nn.Module, adapter_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """PEFT's LoRA layout; a PiSSA / OLoRA adapter becomes a plain rank-2r LoRA against the original weights."""
        config: LoraConfig = adapters(model)[adapter_name].config
        factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        magnitudes: dict[str, torch.Tensor] = {}
        for path, layer in _lora_layers(model, adapter_name):
            a = layer.factor_a(adapter_name).weight.detach()
            b = layer.factor_b(adapter_name).weight.detach()
            if adapter_name in layer.residual_init:  # W_orig + s' B' A' = W_res + s (B A) with s' = s: [A; A0]
                a0, b0 = layer.residual_init[adapter_name]
                a = torch.cat([a.float(), a0.to(a.device)], 0).to(a.dtype)
                b = torch.cat([b.float(), -b0.to(b.device)], 1).to(b.dtype)
            bias = layer.factor_b(adapter_name).bias
            factors[path] = (a, b, None if bias is None else bias.detach())
            if adapter_name in layer.lora_magnitude_vector:
                magnitudes[path] = layer.lora_magnitude_vector[adapter_name].detach()
        saved, saved_tensors = export_saved(model, adapter_name)
        config_json = _peft_config(model, config, list(factors), saved or None)
        if config.target_parameters:
            config_json["target_parameters"] = exported_names(model, config, adapter_name)
            saved_tensors.update(param_tensors(model, adapter_name))
        return config_json, {**lora_tensors(factors, magnitudes=magnitudes), **saved_tensors}

    def load(self, model: nn.Module, config_json: dict, tensors: dict[str, torch.Tensor], adapter_name: str) -> LoraConfig:
        """Inject a LoRA adapter saved by peftkit or HF PEFT and copy its tensors in (shapes checked)."""
        saved, tensors = split_saved(tensors, saved_module_names(config_json))
        names, param_keys, linear_tensors = split_param_tensors(model, config_json, tensors)
        config, paths = config_from_peft(model, {**config_json, "target_parameters": None}, linear_tensors)
        if names:
            config = replace(config, target_modules=config.target_modules if paths else (), target_parameters=names)
            check_param_shapes(model, config, tensors, param_keys)
        overlap = set(saved) & set(paths)
        if overlap:
            raise PeftkitError(f"module {sorted(overlap)[0]!r} is both LoRA-adapted and saved in full; the file is inconsistent")
        load_saved_modules(model, saved, adapter_name)  # before inject, which activates the adapter everywhere
        inject(model, config, adapter_name)
        load_lora_tensors(model, tensors, paths, adapter_name)
        load_param_tensors(model, tensors, param_keys, adapter_name)
        return config

    def saved_activations(self, config: LoraConfig, shape: ModelShape, act_bytes: int, seq_len: int) -> SavedActivations:
        """The inputs its A projections save (one per distinct input) and their rank-r outputs (module docstring);
        parameter targets: `param_targets.param_saved`."""
        targets = set(estimated_targets(config, shape))
        a, h = act_bytes, shape.hidden
        saved = a * h if targets & {"q_proj", "k_proj", "v_proj"} else 0  # shared input of q/k/v
        saved += a * h if targets & {"gate_proj", "up_proj"} else 0
        saved += a * shape.intermediate if "down_proj" in targets else 0
        linears = SavedActivations(saved + a * config.r * len(targets & {lin.name for lin in shape.linears}))
        if not config.target_parameters:
            return linears
        params = param_saved(config, shape, act_bytes)
        return SavedActivations(linears.per_layer + params.per_layer, weights_per_layer=params.weights_per_layer)


def estimated_targets(config: LoraConfig, shape: ModelShape) -> list[str]:
    """The linears of one decoder layer LoRA wraps, as the estimator models them (None: the shape's defaults)."""
    return shape.target_linears(shape.default_targets if config.target_modules is None else config.target_modules)


def _lora_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    """(path, layer) for every LoraLayer that holds `adapter_name`."""
    return [(p, m) for p, m in base_modules(model) if isinstance(m, LoraLayer) and adapter_name in m.lora_A]


def _peft_config(model: nn.Module, config: LoraConfig, paths: list[str], saved: list[str] | None) -> dict:
    """adapter_config.json for this adapter (`format.peft_lora_config`).

    target_modules lists module names when every module of those names is adapted; otherwise (layers_to_transform,
    a regex) it is a regex of the exact paths, so HF PEFT re-creates precisely the saved modules.
    """
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    all_paths = {p for p, _ in base_modules(model)}
    covered = {p for p in all_paths if p.rsplit(".", 1)[-1] in leaves and _is_linear(model, p)}
    exact = covered == set(paths)
    targets: list[str] | str = leaves if exact else "^(" + "|".join(re.escape(p) for p in paths) + ")$"
    r, alpha = config.r, config.alpha
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    if config.init in RESIDUAL_INITS:  # exported as rank 2r with the same scale
        r, alpha = 2 * r, alpha * (math.sqrt(2) if config.use_rslora else 2)
        factor = alpha / config.alpha
        rank_pattern = {k: 2 * v for k, v in rank_pattern.items()}
        alpha_pattern = {k: v * factor for k, v in alpha_pattern.items()}
    return peft_lora_config(
        r=r, lora_alpha=alpha, target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        use_rslora=config.use_rslora, lora_dropout=config.lora_dropout, lora_bias=config.lora_bias,
        use_dora=config.use_dora,
        fan_in_fan_out=any(model.get_submodule(p).fan_in_fan_out for p in paths), modules_to_save=saved,
    )


def _is_linear(model: nn.Module, path: str) -> bool:
    module = model.get_submodule(path)
    return isinstance(module, (LoraLayer, *LINEAR_TYPES))


register(LoraMethod())

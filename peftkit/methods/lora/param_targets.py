"""Which parameters `target_parameters` selects, their injection, and their tensors in PEFT's format both ways.

Matching is PEFT's: a parameter's key `<module path>.<param>` is selected when it equals a listed name or ends with
"." + name (`mlp.experts.gate_up_proj` selects `model.layers.3.mlp.experts.gate_up_proj`).

On disk PEFT nests one ParamWrapper per parameter around the owning module, in the module's parameter order, the
last one outermost; so of n targeted parameters of a module at `path`, the j-th (0-based) is saved under
`base_model.model.<path>.` + `base_layer.` * (n - 1 - j) + `lora_A.weight` / `lora_B.weight` (Qwen3-MoE's experts:
gate_up_proj under `experts.base_layer.lora_A.weight`, down_proj under `experts.lora_A.weight`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from peftkit.core.inject import base_modules, layer_index, replace_module
from peftkit.core.method import PEFT_PREFIX, AdapterLayer
from peftkit.core.shapes import ModelShape, SavedActivations
from peftkit.errors import PeftkitError
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.experts import ParamLoraLayer, pair_shapes


def _owned(module: nn.Module) -> nn.Module:
    """The module whose parameters are matched: a ParamLoraLayer's wrapped module, else the module itself."""
    return module.base_layer if isinstance(module, ParamLoraLayer) else module


def find_parameter_targets(model: nn.Module, names: Sequence[str],
                           layers_to_transform: Sequence[int] | None = None) -> dict[str, list[str]]:
    """{module path: its selected parameter names, in the module's order}; none selected is an error listing the
    2-D / 3-D parameters the model has."""
    wanted = None if layers_to_transform is None else set(layers_to_transform)
    found: dict[str, list[str]] = {}
    candidates: set[str] = set()
    for path, module in base_modules(model):
        if isinstance(module, AdapterLayer) and not isinstance(module, ParamLoraLayer):
            continue  # a LoRA linear's weight is adapted as a module already
        for param, weight in _owned(module).named_parameters(recurse=False):
            key = f"{path}.{param}"
            if weight.ndim in (2, 3):
                candidates.add(".".join(key.rsplit(".", 2)[-2:]))
            if any(key == n or key.endswith("." + n) for n in names) and (wanted is None or layer_index(path) in wanted):
                found.setdefault(path, []).append(param)
    if not found:
        raise PeftkitError(f"target_parameters {list(names)} match no parameter; the model has: "
                           f"{', '.join(sorted(candidates))}")
    return found


def inject_parameters(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Wrap every module owning a targeted parameter in a ParamLoraLayer (or reuse it) and add the adapter's pairs."""
    assert config.target_parameters is not None
    for path, params in find_parameter_targets(model, config.target_parameters, config.layers_to_transform).items():
        layer = model.get_submodule(path)
        if not isinstance(layer, ParamLoraLayer):
            layer = ParamLoraLayer(layer)
            replace_module(model, path, layer)
        for param in params:
            r, alpha = config.rank_alpha(f"{path}.{param}")
            layer.add_adapter(adapter_name, param, r, alpha, config.use_rslora, config.init)


def saved_keys(path: str, params: list[str]) -> dict[str, tuple[str, str]]:
    """{PEFT key: (param, "A" | "B")} of one module's targeted parameters (module docstring)."""
    keys = {}
    for j, param in enumerate(params):
        prefix = f"{PEFT_PREFIX}{path}.{'base_layer.' * (len(params) - 1 - j)}"
        keys[prefix + "lora_A.weight"] = (param, "A")
        keys[prefix + "lora_B.weight"] = (param, "B")
    return keys


def param_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, ParamLoraLayer]]:
    """(path, layer) of every ParamLoraLayer holding `adapter_name`."""
    return [(p, m) for p, m in base_modules(model) if isinstance(m, ParamLoraLayer) and adapter_name in m.lora_A]


def param_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's parameter-LoRA tensors under PEFT's keys."""
    tensors = {}
    for path, layer in param_layers(model, adapter_name):
        for key, (param, slot) in saved_keys(path, layer.param_names()).items():
            tensors[key] = layer.factors(adapter_name, param)[slot == "B"].detach().contiguous()
    return tensors


def exported_names(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """`target_parameters` for adapter_config.json: the config's names when they select exactly the adapted
    parameters in PEFT (which knows no layers_to_transform for them), else every adapted parameter's full key."""
    assert config.target_parameters is not None
    adapted = {f"{p}.{n}" for p, layer in param_layers(model, adapter_name) for n in layer.param_names()}
    everywhere = find_parameter_targets(model, config.target_parameters)
    if {f"{p}.{n}" for p, names in everywhere.items() for n in names} == adapted:
        return list(config.target_parameters)
    return sorted(adapted)


def split_param_tensors(model: nn.Module, config_json: dict, tensors: dict[str, torch.Tensor]
                        ) -> tuple[tuple[str, ...], dict[str, tuple[str, str, str]], dict[str, torch.Tensor]]:
    """(the config's target_parameters, {key: (module path, param, slot)} of their tensors, the other tensors).
    Every targeted parameter must have both of its tensors."""
    names = config_json.get("target_parameters") or []
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise PeftkitError(f"adapter_config.json field 'target_parameters' must be a list of parameter names, got "
                           f"{names!r}")
    if not names:
        return (), {}, tensors
    expected = {key: (path, param, slot) for path, params in find_parameter_targets(model, names).items()
                for key, (param, slot) in saved_keys(path, params).items()}
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise PeftkitError(f"adapter_config.json targets parameters {names} but the file lacks {missing[0]!r}; "
                           "the file is incomplete or was saved for another model")
    return tuple(names), expected, {k: v for k, v in tensors.items() if k not in expected}


def check_param_shapes(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor],
                       keys: dict[str, tuple[str, str, str]]) -> None:
    """Every saved pair must fit its parameter at the config's rank (before anything is injected)."""
    for key, (path, param, slot) in keys.items():
        r, _ = config.rank_alpha(f"{path}.{param}")
        expected = pair_shapes(_owned(model.get_submodule(path)), param, r)[slot == "B"]
        if tuple(tensors[key].shape) != expected:
            raise PeftkitError(f"adapter tensor {key!r} has shape {tuple(tensors[key].shape)} but the model needs "
                               f"{expected} (r={r} per expert of {param!r}); the adapter does not fit this model")


def load_param_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], keys: dict[str, tuple[str, str, str]],
                       adapter_name: str) -> None:
    """Copy the checked pairs into the freshly injected adapter."""
    with torch.no_grad():
        for key, (path, param, slot) in keys.items():
            layer = cast(ParamLoraLayer, model.get_submodule(path))
            layer.factors(adapter_name, param)[slot == "B"].copy_(tensors[key])



def param_saved(config: LoraConfig, shape: ModelShape, act_bytes: int) -> SavedActivations:
    """What LoRA on the parameters of `config.target_parameters` keeps for backward in one decoder layer of `shape`
    (a mixture-of-experts model), in the compute dtype's `act_bytes` a:

    per token: the input of each adapted expert weight for each of the k routed copies (the grouped matmul saves
    it once its weight needs a gradient): a k h for gate_up_proj, a k i_e for down_proj; a h for the router's weight.
    per layer (`weights_per_layer`): the whole W + ΔW, a E d_in d_out per weight, and A, B cast to W's dtype,
    a r E (d_in + d_out) (under bf16 the cast is the factor itself: counted anyway, well under 1%).
    """
    if not shape.experts:
        raise PeftkitError("the estimate models target_parameters only on mixture-of-experts models (experts' "
                           "gate_up_proj / down_proj, the router's gate.weight)")
    a, h, i_e, experts = act_bytes, shape.hidden, shape.expert_intermediate, shape.experts
    known = {"gate_up_proj": (experts, h, 2 * i_e, shape.top_k), "down_proj": (experts, i_e, h, shape.top_k),
             "gate.weight": (1, h, experts, 1), "router.weight": (1, h, experts, 1)}
    per_token = fixed = 0
    for name in config.target_parameters or ():
        leaf = next((k for k in known if name == k or name.endswith("." + k)), None)
        if leaf is None:
            raise PeftkitError(f"the estimate knows target_parameters {', '.join(known)}; got {name!r}")
        count, d_in, d_out, copies = known[leaf]
        r, _ = config.rank_alpha(name)
        per_token += a * copies * d_in
        fixed += a * count * d_in * d_out + a * r * count * (d_in + d_out)
    return SavedActivations(per_layer=per_token, weights_per_layer=fixed)

"""Build a model for a `TrainingSetup` on the meta device: method applied, dtypes set, nothing allocated.

Shared by the tracer (which then materializes the parameters as fake tensors) and by the parameter counts of the
analytic estimator. PEFT methods are injected through the registry (`peftkit.core.inject`), so the counts and the
traced modules are those of the real method code; `full` and `freeze` inject nothing.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from peftkit.errors import PeftkitError
from peftkit.memory.training_setup import TrainingSetup

# setup.method -> registry name of the method the core/methods engineers register
REGISTRY_NAMES = {"lora": "lora", "qlora": "lora", "adapter": "adapter", "prefix": "prefix", "prompt": "prompt"}
# our option names -> the names the registry's `build_config` takes
_REGISTRY_OPTION = {"bits": None, "trainable_layers": None}


def registered_method(method: str):
    """The registry's Method object for a PEFT method, or None when the core has not registered it (yet)."""
    name = REGISTRY_NAMES.get(method)
    if name is None:
        return None
    try:
        registry = importlib.import_module("peftkit.core.registry")
        importlib.import_module("peftkit.methods")
        return registry.get_method(name)
    except (ImportError, PeftkitError, AttributeError):
        return None


def build_meta_model(config: PretrainedConfig, setup: TrainingSetup) -> nn.Module:
    """The HF causal LM for `config` on the meta device with `setup`'s method applied and dtypes set.

    dtypes: fp32 -> all fp32; bf16 -> all bf16; amp -> trainable fp32, frozen bf16 (see `setup.py`).
    """
    config = _train_config(config)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_method(model, setup)
    frozen_dtype = torch.float32 if setup.precision == "fp32" else torch.bfloat16
    trainable_dtype = torch.bfloat16 if setup.precision == "bf16" else torch.float32
    for p in model.parameters():
        p.data = p.data.to(trainable_dtype if p.requires_grad else frozen_dtype)
    return model


def _train_config(config: PretrainedConfig) -> PretrainedConfig:
    config = copy.deepcopy(config)
    return config


def apply_method(model: nn.Module, setup: TrainingSetup) -> None:
    """Make the parameters `setup.method` trains trainable (injecting adapters through the registry)."""
    if setup.method == "full":
        model.requires_grad_(True)
        return
    if setup.method == "freeze":
        model.requires_grad_(False)
        layers = _decoder_layers(model)
        n = setup.option("trainable_layers", 2)
        if n > len(layers):
            raise PeftkitError(f"trainable_layers={n} but the model has {len(layers)} decoder layers")
        for layer in list(layers)[-n:]:
            layer.requires_grad_(True)
        return
    method = registered_method(setup.method)
    if method is None:
        raise PeftkitError(f"method {setup.method!r} is not registered in this peftkit build; it cannot be built")
    options = {k: v for k, v in setup.method_options.items() if k not in _REGISTRY_OPTION}
    from peftkit.core.inject import inject

    inject(model, method.build_config(options))


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The longest nn.ModuleList: the decoder stack of every HF causal LM."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise PeftkitError("cannot find the decoder layers of this model")
    return max(lists, key=len)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total

"""Bottleneck adapters (AdapterHub's family): config, injection and save / load. The modules are in
`layer.py`.

Variants (`--method adapter --variant ...`), each placing a d -> m -> d adapter around sublayers of every decoder
layer (which modules are "attention" and "MLP" comes from `peftkit.core.archs`, per model_type):

    houlsby   (Houlsby et al. 2019)   sequential, after the attention block and after the MLP   2 adapters / layer
    pfeiffer  (Pfeiffer et al. 2020)  sequential, after the MLP only                             1 adapter / layer
    parallel  (He et al. 2021)        beside the MLP, output scaled by s (default 4)             1 adapter / layer

Trainable parameters: (2*d*m + m + d) per adapter, m = d // reduction_factor (or `bottleneck_size`). Saved for
backward per adapter, bytes per token (a: bytes of the compute dtype): the down projection's input (a d), its
output and the non-linearity's output (2 a m).
Saved as peft_type PEFTKIT_ADAPTER in PEFT's two files; HF PEFT and vLLM have no such type and cannot load it.
Not mergeable: the adapter is non-linear, so no weight matrix can absorb it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from peftkit.core.archs import arch_spec, get_submodule, hidden_size
from peftkit.core.inject import inject, replace_module
from peftkit.core.method import PEFT_PREFIX, Method, check_positive, config_fields
from peftkit.core.method_options import DROPOUT, REDUCTION_FACTOR, VARIANT
from peftkit.core.registry import register
from peftkit.core.shapes import ModelShape, SavedActivations
from peftkit.core.state import adapters
from peftkit.errors import PeftkitError
from peftkit.methods.bottleneck.layer import ACTIVATIONS, Bottleneck, BottleneckLayer
from peftkit.methods.virtual_tokens import input_embeddings

VARIANTS: dict[str, tuple[str, ...]] = {"houlsby": ("attention", "mlp"), "pfeiffer": ("mlp",), "parallel": ("mlp",)}
LOCATIONS = ("attention", "mlp")
_PARTS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")


@dataclass(frozen=True)
class AdapterConfig:
    """Bottleneck adapter hyper-parameters (AdapterHub's names where they exist).

    variant: houlsby | pfeiffer | parallel. reduction_factor: m = d // reduction_factor, unless bottleneck_size
    gives m directly. non_linearity: relu | gelu | silu | tanh. scaling: the adapter output's factor (None: 4.0
    for parallel as in He et al., 1.0 for the sequential variants). locations: which sublayers get an adapter
    ("attention", "mlp"); None takes the variant's placement (houlsby both, pfeiffer and parallel the MLP).
    """

    variant: str = "houlsby"
    reduction_factor: int = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    dropout: float = 0.0
    scaling: float | None = None
    locations: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", VARIANT.check(self.variant, required=True))  # VARIANTS' names
        object.__setattr__(self, "reduction_factor", REDUCTION_FACTOR.check(self.reduction_factor, required=True))
        if self.bottleneck_size is not None:
            check_positive("bottleneck_size", self.bottleneck_size)
        if self.non_linearity not in ACTIVATIONS:
            raise PeftkitError(f"unknown non_linearity {self.non_linearity!r}; choose one of {', '.join(ACTIVATIONS)}")
        object.__setattr__(self, "dropout", DROPOUT.check(self.dropout, required=True))
        if self.scaling is None:
            object.__setattr__(self, "scaling", 4.0 if self.variant == "parallel" else 1.0)
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise PeftkitError(f"scaling must be a number, got {self.scaling!r}")
        locations = self.locations if self.locations is not None else VARIANTS[self.variant]
        locations = (locations,) if isinstance(locations, str) else tuple(locations)
        if not locations or any(loc not in LOCATIONS for loc in locations):
            raise PeftkitError(f"adapter locations {list(locations)} are invalid; choose from {', '.join(LOCATIONS)}")
        object.__setattr__(self, "locations", locations)

    @property
    def output_scaling(self) -> float:
        """`scaling` as built (`__post_init__` fills a None per variant)."""
        assert self.scaling is not None
        return self.scaling

    @property
    def sublayers(self) -> tuple[str, ...]:
        """`locations` as built (`__post_init__` fills a None with the variant's)."""
        assert self.locations is not None
        return self.locations

    def size(self, hidden: int) -> int:
        """The bottleneck width m for hidden size d (checked: 1 <= m)."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        if self.reduction_factor > hidden:
            raise PeftkitError(
                f"reduction_factor {self.reduction_factor} is larger than the hidden size {hidden} (bottleneck would be "
                f"empty); use at most {hidden}"
            )
        return hidden // self.reduction_factor


def adapter_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Paths of the sublayers (attention blocks / MLPs of every decoder layer) that get an adapter."""
    spec = arch_spec(model)
    model_type = getattr(model.config, "model_type", None)
    layers = get_submodule(model, spec.layers) if spec.layers else None
    if not isinstance(layers, nn.ModuleList):
        raise PeftkitError(f"model_type {model_type!r}: peftkit cannot find its decoder layers (looked at {spec.layers!r})")
    paths = []
    for location in config.sublayers:
        name = spec.attention if location == "attention" else spec.mlp
        if not name:
            raise PeftkitError(
                f"model_type {model_type!r}: peftkit cannot find the {location} module of its decoder layers; "
                f"add the model_type to peftkit/core/archs.py (known: attention / MLP for llama, qwen2, mistral, gpt2, ...)"
            )
        for index in range(len(layers)):
            path = f"{spec.layers}.{index}.{name}"
            if get_submodule(model, path) is None:
                raise PeftkitError(f"model_type {model_type!r}: the {location} module {path!r} does not exist")
            paths.append(path)
    return paths


class AdapterMethod(Method):
    """Registry entry for bottleneck adapters (`--method adapter --variant houlsby --reduction-factor 16`)."""

    name = "adapter"
    peft_type = "PEFTKIT_ADAPTER"
    config_cls = AdapterConfig
    mergeable = False
    why_not_mergeable = (
        "a bottleneck adapter applies a non-linearity (W_up f(W_down h)), so no single weight matrix can absorb it."
    )
    option_fields = {"variant": "variant", "reduction_factor": "reduction_factor", "dropout": "dropout"}

    def inject(self, model: nn.Module, config: AdapterConfig, adapter_name: str) -> None:
        """Wrap each targeted sublayer in a BottleneckLayer (or reuse it) and add the adapter."""
        d = hidden_size(model)
        m = config.size(d)
        weight = input_embeddings(model).weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        for path in adapter_targets(model, config):
            module = model.get_submodule(path)
            if not isinstance(module, BottleneckLayer):
                module = BottleneckLayer(module, d)
                replace_module(model, path, module)
            parallel = config.variant == "parallel"
            module.add_adapter(adapter_name, m, config.non_linearity, config.dropout, parallel, config.output_scaling, factory)

    def export(self, model: nn.Module, adapter_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """Our own type in PEFT's layout: base_model.model.<sublayer>.adapter_down / adapter_up .weight / .bias."""
        config: AdapterConfig = adapters(model)[adapter_name].config
        tensors = {}
        for path in adapter_targets(model, config):
            state = _adapter(model, path, adapter_name).state_dict()
            for part in _PARTS:
                tensors[f"{PEFT_PREFIX}{path}.{part}"] = state[part].detach().contiguous()
        config_json = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "inference_mode": True}
        config_json.update(config_fields(config))
        config_json["bottleneck_size"] = config.size(hidden_size(model))
        return config_json, tensors

    def load(self, model: nn.Module, config_json: dict, tensors: dict[str, torch.Tensor], adapter_name: str) -> AdapterConfig:
        """Check every saved tensor against the model, then inject and copy them in."""
        fields = {f.name for f in dataclasses.fields(AdapterConfig)}
        config = AdapterConfig(**{k: v for k, v in config_json.items() if k in fields})
        d = hidden_size(model)
        m = config.size(d)
        expected = {"adapter_down.weight": (m, d), "adapter_down.bias": (m,), "adapter_up.weight": (d, m), "adapter_up.bias": (d,)}
        wanted = {f"{PEFT_PREFIX}{p}.{part}": (p, part) for p in adapter_targets(model, config) for part in _PARTS}
        for key in sorted(set(tensors) ^ set(wanted)):
            what = "is not a tensor of" if key in tensors else "is missing from"
            raise PeftkitError(f"adapter tensor {key!r} {what} this adapter for this model (was it trained for another base model?)")
        for key, (_, part) in wanted.items():
            if tuple(tensors[key].shape) != expected[part]:
                raise PeftkitError(f"adapter tensor {key!r} has shape {tuple(tensors[key].shape)}, the model needs {expected[part]}")
        inject(model, config, adapter_name)
        with torch.no_grad():
            for key, (path, part) in wanted.items():
                _adapter(model, path, adapter_name).get_parameter(part).copy_(tensors[key])
        return config

    def saved_activations(self, config: AdapterConfig, shape: ModelShape, act_bytes: int, seq_len: int) -> SavedActivations:
        """Per adapter (one per location in each layer): the down projection's input, its output, the activation's."""
        a, m = act_bytes, config.size(shape.hidden)
        return SavedActivations(len(config.sublayers) * (a * shape.hidden + 2 * a * m))


def _adapter(model: nn.Module, path: str, adapter_name: str) -> Bottleneck:
    """Adapter `adapter_name` of the BottleneckLayer at `path`."""
    layer = model.get_submodule(path)
    if not isinstance(layer, BottleneckLayer):
        raise PeftkitError(f"module {path!r} holds no bottleneck adapter")
    return layer.adapter(adapter_name)


register(AdapterMethod())

"""What LoKr (`lokr.py`) and LoHa (`loha.py`) share: the LyCORIS family's config fields, a layer whose adapters
each build a whole weight update ΔW [out, in] from small factors, and the method that injects, saves and loads
such layers in HF PEFT 0.21.2's format (peft_type `LOKR` / `LOHA`).

    y = W x + b + F.linear(x, ΔW)         ΔW = (alpha / r) * f(factors), built in every forward

Each method defines only f and its factors (ParameterDicts named as PEFT names them: `lokr_w1`, `hada_w1_a`, ...;
PEFT saves them as `base_model.model.<module path>.<name>`, no ".weight"). Training-time regularisation, as PEFT:
`module_dropout` skips the whole adapter of a layer with that probability per forward; `rank_dropout` zeroes each
output row of ΔW with that probability (then rescales the kept rows by 1 / their mean when `rank_dropout_scale`).

The wrapped layer is an nn.Linear or GPT-2's Conv1D (weight stored [in, out]: ΔW is added transposed). HF PEFT
0.21.2 refuses Conv1D targets for LoKr / LoHa, so an adapter of a GPT-2 model loads in peftkit only (its
adapter_config.json then says `fan_in_fan_out: true`, a field PEFT's LoKr / LoHa lack, for `peftkit check`).

Saved for backward (the memory estimator's hook): F.linear saves the layer's input (shared as LoRA's A shares it)
and ΔW itself, a whole weight-sized tensor per adapted linear, held from its layer's forward to its backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.archs import LINEAR_TYPES
from peftkit.core.inject import base_modules, find_targets, inject, refuse_unsupported_fields, replace_module
from peftkit.core.method import PEFT_PREFIX, AdapterLayer, Method, config_fields
from peftkit.core.method_options import ALPHA, DROPOUT, RANK
from peftkit.core.shapes import ModelShape, SavedActivations
from peftkit.core.state import adapters
from peftkit.errors import PeftkitError
from peftkit.methods.lora.config import _pattern_value, normalize_targets
from peftkit.methods.lora.format import target_modules_for


@dataclass(frozen=True)
class LycorisConfig:
    """The fields LoKr and LoHa share, named and defaulted as in PEFT's LycorisConfig subclasses (r 8, alpha 8).

    target_modules: None (the architecture's defaults, LoRA's), module names / suffixes, a regex of the full path,
    or "all-linear". rank_pattern / alpha_pattern: module regex -> its own r / alpha (PEFT's suffix rule).
    use_effective_conv2d only concerns convolutions with a kernel; it is kept so configs round-trip.
    """

    r: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    init_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_effective_conv2d: bool = False

    INITS: ClassVar[tuple[bool | str, ...]] = (True, False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "r", RANK.check(self.r, required=True))
        object.__setattr__(self, "alpha", ALPHA.check(self.alpha, required=True))
        for name in ("rank_dropout", "module_dropout"):
            object.__setattr__(self, name, replace(DROPOUT, name=name).check(getattr(self, name), required=True))
        object.__setattr__(self, "target_modules", normalize_targets(self.target_modules))
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            object.__setattr__(self, "layers_to_transform", (layers,) if isinstance(layers, int) else tuple(layers))
        if self.init_weights not in self.INITS or not isinstance(self.init_weights, (bool, str)):
            raise PeftkitError(f"init_weights must be one of {', '.join(map(str, self.INITS))}, got {self.init_weights!r}")
        for key, rank in self.rank_pattern.items():
            replace(RANK, name=f"rank_pattern[{key!r}]").check(rank, required=True)
        check_bool(self, "use_effective_conv2d")

    def rank_alpha(self, path: str) -> tuple[int, float]:
        """(r, alpha) for the module at `path`, after rank_pattern / alpha_pattern."""
        return _pattern_value(self.rank_pattern, path, self.r), _pattern_value(self.alpha_pattern, path, self.alpha)


def check_bool(config: object, name: str) -> None:
    """Raise PeftkitError unless the config's field `name` is true or false."""
    value = getattr(config, name)
    if not isinstance(value, bool):
        raise PeftkitError(f"{name} must be true or false, got {value!r}")


class DeltaLayer(AdapterLayer):
    """Wraps one linear layer (`base_layer`); each adapter builds a whole ΔW [out, in] from its factors.

    Subclasses keep the factors in ParameterDicts (PEFT's names), create them in `add_factors` and combine them in
    `unscaled_delta`; everything else (forward with dropouts, merge, unmerge, unload, export) is here.
    """

    rank_dropout_scale_fixed: ClassVar[bool | None] = None  # LoHa always rescales; LoKr has it as an option

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # GPT-2 Conv1D stores W as [in, out]
        self.out_features: int
        self.in_features: int
        if isinstance(base_layer, nn.Linear):
            self.out_features, self.in_features = base_layer.out_features, base_layer.in_features
        else:
            self.in_features, self.out_features = self.weight.shape
        self.scaling: dict[str, float] = {}
        self.dropouts: dict[str, tuple[float, float, bool]] = {}  # name -> (rank, module, rescale kept rows)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (code that reads `module.weight` keeps working after injection)."""
        return cast(torch.Tensor, self.base_layer.weight)

    def add_adapter(self, name: str, config: Any, r: int, alpha: float) -> None:
        """Create adapter `name` of rank `r` (factors initialised unless on the meta device)."""
        weight = self.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.add_factors(name, config, r, weight.device, dtype)
        self.scaling[name] = alpha / r
        rescale = self.rank_dropout_scale_fixed
        self.dropouts[name] = (config.rank_dropout, config.module_dropout,
                               config.rank_dropout_scale if rescale is None else rescale)

    def add_factors(self, name: str, config: Any, r: int, device: torch.device, dtype: torch.dtype) -> None:
        """Create (and, off the meta device, initialise as `config.init_weights` says) adapter `name`'s factors."""
        raise NotImplementedError

    def unscaled_delta(self, name: str, fp32: bool = False) -> torch.Tensor:
        """f(factors) of adapter `name`, [out, in], with autograd (fp32: detached factors in fp32, for merging)."""
        raise NotImplementedError

    def factor(self, attr: str, name: str, fp32: bool) -> torch.Tensor:
        """Factor `attr` (a ParameterDict name) of adapter `name`; detached in fp32 when `fp32`."""
        param = cast(nn.ParameterDict, getattr(self, attr))[name]
        return param.detach().float() if fp32 else param

    def factors(self, name: str) -> dict[str, nn.Parameter]:
        """{PEFT tensor name: parameter} of adapter `name` (`lokr_w1`, `hada_w1_a`, ...)."""
        return {attr: child[name] for attr, child in self.named_children()
                if isinstance(child, nn.ParameterDict) and name in child}

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * ΔW in fp32, detached, in the base weight's own layout ([in, out] for Conv1D)."""
        delta = self.unscaled_delta(name, fp32=True) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """W x (+ b) + scaling * F.linear(x, ΔW), with PEFT's module and rank dropout while training."""
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if name is None or self.merged_adapters:
            return result
        rank_p, module_p, rescale = self.dropouts[name]
        if self.training and module_p > 0 and float(torch.rand(1)) <= module_p:
            return result
        delta = self.unscaled_delta(name) * self.scaling[name]
        out = F.linear(x.to(delta.dtype), delta)
        if self.training and rank_p > 0:  # zeroing ΔW's output rows = zeroing those output features
            keep = (torch.rand(self.out_features, device=out.device) > rank_p).to(out.dtype)
            out = out * (keep / keep.mean() if rescale else keep)
        return result + out.to(result.dtype)

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        """W <- W + delta, summed in fp32 and rounded once to W's dtype."""
        w = self.weight
        w.data.copy_((w.detach().float() + delta).to(w.dtype))

    def merge(self) -> None:
        """Fold the active adapter into the base weight (W += scaling * ΔW), once."""
        name = self.active_adapter
        if name is None or name in self.merged_adapters:
            return
        self._add_to_weight(self.delta_weight(name))
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight again."""
        while self.merged_adapters:
            self._add_to_weight(-self.delta_weight(self.merged_adapters.pop()))

    def unload(self, names: list[str]) -> nn.Module:
        """The base layer with the adapters `names` summed into its weight (fp32, rounded once)."""
        if names:
            self._add_to_weight(sum(self.delta_weight(n) for n in names))  # type: ignore[arg-type]
        return self.base_layer

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={self.adapter_names()}"


def kaiming(param: torch.Tensor) -> None:
    """PyTorch's default nn.Linear init (uniform, a = sqrt(5)), which PEFT gives the non-zero factors."""
    nn.init.kaiming_uniform_(param, a=math.sqrt(5))


class DeltaMethod(Method):
    """Registry entry of a `DeltaLayer` method: injection, PEFT-format export / load, memory hook."""

    layer_cls: ClassVar[type[DeltaLayer]]
    mergeable = True
    option_fields = {"rank": "r", "alpha": "alpha", "target_modules": "target_modules"}
    peft_refuses_conv1d = True

    def inject(self, model: nn.Module, config: LycorisConfig, adapter_name: str) -> None:
        """Wrap every targeted linear layer in the method's layer (or add to one) with a new adapter."""
        for path in find_targets(model, config.target_modules, config.layers_to_transform):
            module = model.get_submodule(path)
            if not isinstance(module, self.layer_cls):
                if isinstance(module, AdapterLayer):
                    raise PeftkitError(f"module {path!r} already holds a {type(module).__name__} adapter; one "
                                       f"module takes adapters of one method, so {self.name} cannot wrap it")
                module = self.layer_cls(module)
                replace_module(model, path, module)
            r, alpha = config.rank_alpha(path)
            module.add_adapter(adapter_name, config, r, alpha)

    def layers(self, model: nn.Module, adapter_name: str) -> list[tuple[str, DeltaLayer]]:
        """(path, layer) of every layer of this method that holds `adapter_name`."""
        return [(p, m) for p, m in base_modules(model)
                if isinstance(m, self.layer_cls) and adapter_name in m.adapter_names()]

    def export(self, model: nn.Module, adapter_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """PEFT's layout: the config's fields as PEFT names them, one tensor per factor per adapted module."""
        config = adapters(model)[adapter_name].config
        layers = self.layers(model, adapter_name)
        tensors = {f"{PEFT_PREFIX}{path}.{attr}": param.detach().contiguous()
                   for path, layer in layers for attr, param in layer.factors(adapter_name).items()}
        linears = [p for p, m in base_modules(model) if isinstance(getattr(m, "base_layer", m), LINEAR_TYPES)]
        targets = target_modules_for([p for p, _ in layers], adaptable=linears)
        config_json = {**config_fields(config), "peft_type": self.peft_type, "task_type": "CAUSAL_LM",
                       "target_modules": targets, "layers_to_transform": None, "layers_pattern": None,
                       "exclude_modules": None, "modules_to_save": None, "inference_mode": True, "revision": None}
        if any(layer.fan_in_fan_out for _, layer in layers):  # PEFT has no such field: set only where it refuses
            config_json["fan_in_fan_out"] = True              # anyway, so `peftkit check` can say why
        return config_json, tensors

    def load(self, model: nn.Module, config_json: dict, tensors: dict[str, torch.Tensor], adapter_name: str) -> Any:
        """Inject the adapter saved as (config_json, tensors) by peftkit or HF PEFT and copy its factors in."""
        refuse_unsupported_fields(config_json, self.peft_type or self.name)
        known = {f.name for f in fields(self.config_cls)}
        config = self.build_config({k: v for k, v in config_json.items() if k in known and v is not None})
        inject(model, config, adapter_name)
        wanted = {f"{PEFT_PREFIX}{path}.{attr}": param for path, layer in self.layers(model, adapter_name)
                  for attr, param in layer.factors(adapter_name).items()}
        for key in sorted(set(tensors) ^ set(wanted)):
            what = "is not a factor of this model's adapter" if key in tensors else "is missing from the file"
            raise PeftkitError(f"{self.peft_type} tensor {key!r} {what} (another base model or other options?)")
        with torch.no_grad():
            for key, param in wanted.items():
                if tensors[key].shape != param.shape:
                    raise PeftkitError(f"{self.peft_type} tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                                       f"the model needs {tuple(param.shape)}")
                param.copy_(tensors[key])
        return config

    def saved_activations(self, config: LycorisConfig, shape: ModelShape, act_bytes: int, seq_len: int) -> SavedActivations:
        """F.linear's saved input (one per distinct input, as LoRA's A) and ΔW (a weight per adapted linear)."""
        targets = shape.target_linears(shape.default_targets if config.target_modules is None else config.target_modules)
        a, h = act_bytes, shape.hidden
        saved = a * h if set(targets) & {"q_proj", "k_proj", "v_proj"} else 0  # the shared input of q / k / v
        saved += a * h if set(targets) & {"gate_proj", "up_proj"} else 0
        saved += a * shape.intermediate if "down_proj" in targets else 0
        weights = sum(a * shape.linear(name).d_in * shape.linear(name).d_out for name in targets)
        return SavedActivations(per_layer=saved, weights_per_layer=weights)

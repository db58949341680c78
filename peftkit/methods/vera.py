"""VeRA (Kopiczko et al. 2024, arXiv:2310.11454), in HF PEFT 0.21.2's format both ways (`--method vera`).

One pair of frozen random matrices is shared by every adapted layer of the model; each layer trains two vectors:

    y = W x + b + λ_b ⊙ (B_s (λ_d ⊙ (A_s dropout(x))))      A: [r, max d_in], B: [max d_out, r] (frozen, shared)
                                                           A_s = A[:, :d_in], B_s = B[:d_out, :] (this layer's slice)
                                                           λ_d: [r] (starts at d_initial), λ_b: [d_out] (at 0)

A and B are sized for the largest targeted layer and sliced for each layer, so targets of different shapes share
them. They are drawn as PEFT draws them: a CPU `torch.Generator` seeded with `projection_prng_key`, A then B, each
uniform in ±sqrt(6 / fan_in) (Kaiming uniform, fan_in = its second dimension). λ_b = 0, so an injected model
equals its base until it trains. Merging adds (λ_b ⊙_row B_s)(λ_d ⊙_row A_s) to W. Trainable parameters: r + d_out
per adapted layer. Further VeRA adapters on the same model reuse the first one's matrices, so they must have the
same projection_prng_key, save_projection and r, and layers no larger than the first one's (PEFT refuses them too).

On disk: peft_type "VERA", `base_model.model.<module path>.vera_lambda_b` / `.vera_lambda_d`, and with
`save_projection` the shared `base_model.vera_A` / `base_model.vera_B` (without it they are redrawn from the key).

Saved for backward, bytes per token per layer (a: bytes of the compute dtype): per adapted layer the rank-r
output of A_s (for λ_d's gradient) and the d_out output of B_s (for λ_b's), a (r + d_out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.inject import base_modules, find_targets, inject, replace_module, saved_targets
from peftkit.core.method import PEFT_PREFIX, AdapterLayer, Method, copy_saved_tensors
from peftkit.core.method_options import DROPOUT, RANK
from peftkit.core.registry import register
from peftkit.core.shapes import ModelShape, SavedActivations
from peftkit.core.state import adapters
from peftkit.errors import PeftkitError
from peftkit.methods.lora.config import normalize_targets

PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")  # where PEFT saves the shared matrices


@dataclass(frozen=True)
class VeraConfig:
    """VeRA's options, named as in PEFT's VeraConfig. target_modules: None (the architecture's LoRA defaults), module
    names, a regex of the full path, or "all-linear"; r: the shared projections' rank (PEFT's default 256: VeRA
    trains r + d_out values per layer, so a large r costs little); d_initial: λ_d's first value."""

    r: int = 256
    target_modules: tuple[str, ...] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    layers_to_transform: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "r", RANK.check(self.r, required=True))
        object.__setattr__(self, "vera_dropout", DROPOUT.check(self.vera_dropout, required=True))
        object.__setattr__(self, "target_modules", normalize_targets(self.target_modules))
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int) \
                or not 0 <= self.projection_prng_key < 2**63:
            raise PeftkitError(f"projection_prng_key must be an integer in [0, 2**63), got {self.projection_prng_key!r}")
        if not isinstance(self.save_projection, bool):
            raise PeftkitError(f"save_projection must be true or false, got {self.save_projection!r}")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)) \
                or not math.isfinite(self.d_initial):
            raise PeftkitError(f"d_initial must be a finite number, got {self.d_initial!r}")
        object.__setattr__(self, "d_initial", float(self.d_initial))
        layers = self.layers_to_transform
        if layers is not None:
            object.__setattr__(self, "layers_to_transform", (layers,) if isinstance(layers, int) else tuple(layers))


def projection(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's draw: Kaiming uniform (gain sqrt 2, fan_in = shape[1]), i.e. U(±sqrt(6 / fan_in)), from `generator`."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The frozen A [r, d_in] and B [d_out, r] every VeraLayer of a model shares (one module object, a child of each
    layer, so moving the model moves it once). Non-persistent buffers: the adapter's export writes them."""

    vera_A: torch.Tensor
    vera_B: torch.Tensor

    def __init__(self, config: VeraConfig, d_in: int, d_out: int, device: torch.device) -> None:
        super().__init__()
        self.prng_key, self.save_projection = config.projection_prng_key, config.save_projection
        if device.type == "meta":  # shapes only (parameter counts)
            a, b = torch.empty(config.r, d_in, device=device), torch.empty(d_out, config.r, device=device)
        else:
            generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
            a = projection((config.r, d_in), generator)
            b = projection((d_out, config.r), generator)
        self.register_buffer("vera_A", a.to(device), persistent=False)
        self.register_buffer("vera_B", b.to(device), persistent=False)

    def check_fits(self, config: VeraConfig, d_in: int, d_out: int) -> None:
        """Refuse a further adapter these matrices cannot serve, as PEFT does (one line, what to change)."""
        r, have_in = self.vera_A.shape
        have = {"projection_prng_key": self.prng_key, "save_projection": self.save_projection, "r": r}
        for field, value in have.items():
            if getattr(config, field) != value:
                raise PeftkitError(f"VeRA adapters of one model share their projections: {field} must be {value!r} "
                                   f"like the first adapter's, got {getattr(config, field)!r}")
        if d_in > have_in or d_out > self.vera_B.shape[0]:
            raise PeftkitError(f"this VeRA adapter's layers need projections of at least {d_in} x {d_out} (in x "
                               f"out), the first adapter's are {have_in} x {self.vera_B.shape[0]}; add the adapter "
                               "with the larger layers first")


class VeraLayer(AdapterLayer):
    """Wraps one linear layer (`base_layer`) and holds its VeRA vectors, one pair per adapter name."""

    def __init__(self, base_layer: nn.Module, projections: VeraProjections) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.projections = projections
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # GPT-2's Conv1D stores W as [in, out]
        self.out_features, self.in_features = in_out(base_layer)[::-1]
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (`nn.Module.__getattr__` types it as `Tensor | Module`)."""
        return cast(torch.Tensor, self.base_layer.weight)

    def add_adapter(self, name: str, config: VeraConfig) -> None:
        """λ_b = 0 [d_out] and λ_d = d_initial [r] for adapter `name`, in the base weight's dtype."""
        weight = self.weight
        kw: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
        self.vera_lambda_b[name] = nn.Parameter(torch.zeros(self.out_features, **kw))
        self.vera_lambda_d[name] = nn.Parameter(torch.full((config.r,), config.d_initial, **kw))
        self.vera_dropout[name] = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()

    def _slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's A_s [r, d_in] and B_s [d_out, r]."""
        return self.projections.vera_A[:, : self.in_features], self.projections.vera_B[: self.out_features]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if name is None or self.merged_adapters:
            return out
        a, b = self._slices()
        lambda_d, lambda_b = self.vera_lambda_d[name], self.vera_lambda_b[name]
        hidden = lambda_d * F.linear(self.vera_dropout[name](x), a.to(x.dtype))
        return (out + lambda_b * F.linear(hidden.to(x.dtype), b.to(x.dtype))).to(out.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """(λ_b ⊙_row B_s)(λ_d ⊙_row A_s) in fp32, in the base weight's own layout ([in, out] for Conv1D)."""
        a, b = (t.float() for t in self._slices())
        lambda_d, lambda_b = self.vera_lambda_d[name].detach().float(), self.vera_lambda_b[name].detach().float()
        delta = (lambda_b[:, None] * b) @ (lambda_d[:, None] * a)
        return delta.T if self.fan_in_fan_out else delta

    def _add(self, name: str, sign: float) -> None:
        weight = self.weight
        weight.data = (weight.data.float() + sign * self.delta_weight(name)).to(weight.dtype)

    def merge(self) -> None:
        if self.active_adapter is not None and not self.merged_adapters:
            self._add(self.active_adapter, 1.0)
            self.merged_adapters.append(self.active_adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._add(self.merged_adapters.pop(), -1.0)

    def unload(self, names: list[str]) -> nn.Module:
        for name in names:
            self._add(name, 1.0)
        return self.base_layer


def in_out(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear layer: nn.Linear stores W as [out, in], GPT-2's Conv1D as [in, out]."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    d_in, d_out = cast(torch.Tensor, module.weight).shape
    return d_in, d_out


def _layers(model: nn.Module, adapter_name: str | None = None) -> list[tuple[str, VeraLayer]]:
    """(path, layer) of every VeraLayer (holding `adapter_name`, when given)."""
    return [(p, m) for p, m in base_modules(model)
            if isinstance(m, VeraLayer) and (adapter_name is None or adapter_name in m.vera_lambda_d)]


class VeraMethod(Method):
    """Registry entry for VeRA (`peftkit train --method vera`)."""

    name = "vera"
    peft_type = "VERA"
    config_cls = VeraConfig
    mergeable = True
    option_fields = {"rank": "r", "dropout": "vera_dropout", "target_modules": "target_modules"}
    default_lr = 4e-3  # two vectors per layer on frozen random projections: the paper trains at 4e-3 (10x LoRA)
    bundled_lr = 4e-2  # 10x default_lr, as the bundled task's 2e-3 is 10x LoRA's; at 2e-3 its loss stays flat

    def inject(self, model: nn.Module, config: VeraConfig, adapter_name: str) -> None:
        """Wrap every targeted linear in a VeraLayer sharing the model's projections (made for the first adapter,
        sized for its largest layer) and add the adapter's two vectors."""
        paths = find_targets(model, config.target_modules, config.layers_to_transform)
        sizes = [in_out(getattr(model.get_submodule(p), "base_layer", model.get_submodule(p))) for p in paths]
        d_in, d_out = max(s[0] for s in sizes), max(s[1] for s in sizes)
        existing = _layers(model)
        if existing:
            projections = existing[0][1].projections
            projections.check_fits(config, d_in, d_out)
        else:
            device = cast(torch.Tensor, model.get_submodule(paths[0]).weight).device
            projections = VeraProjections(config, d_in, d_out, device)
        for path in paths:
            module = model.get_submodule(path)
            if not isinstance(module, VeraLayer):
                module = VeraLayer(module, projections)
                replace_module(model, path, module)
            module.add_adapter(adapter_name, config)

    def export(self, model: nn.Module, adapter_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """PEFT's VeRA layout: λ_b, λ_d per adapted module, and the shared A, B with save_projection."""
        config: VeraConfig = adapters(model)[adapter_name].config
        layers = _layers(model, adapter_name)
        tensors: dict[str, torch.Tensor] = {}
        for path, layer in layers:
            for kind in ("vera_lambda_b", "vera_lambda_d"):
                tensors[f"{PEFT_PREFIX}{path}.{kind}"] = getattr(layer, kind)[adapter_name].detach().contiguous()
        if config.save_projection:
            shared = layers[0][1].projections
            tensors.update(zip(PROJECTION_KEYS, (shared.vera_A.contiguous(), shared.vera_B.contiguous()), strict=True))
        config_json = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "inference_mode": True, "r": config.r,
                       "target_modules": saved_targets(model, [p for p, _ in layers], config.target_modules),
                       "projection_prng_key": config.projection_prng_key, "save_projection": config.save_projection,
                       "vera_dropout": config.vera_dropout, "d_initial": config.d_initial,
                       "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers), "bias": "none",
                       "modules_to_save": None, "init_weights": True, "layers_to_transform": None,
                       "layers_pattern": None}
        return config_json, tensors

    def load(self, model: nn.Module, config_json: dict, tensors: dict[str, torch.Tensor], adapter_name: str) -> VeraConfig:
        """Inject a VeRA adapter saved by peftkit or HF PEFT and copy its tensors in (names and shapes checked)."""
        if config_json.get("bias", "none") != "none" or config_json.get("modules_to_save"):
            raise PeftkitError("this VeRA adapter trains biases or whole modules (bias / modules_to_save), which "
                               "peftkit's VeRA does not load; save it with bias 'none' and no modules_to_save")
        fields = ("r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
                  "layers_to_transform")
        config = VeraConfig(**{k: config_json[k] for k in fields if config_json.get(k) is not None})
        if config.save_projection and not set(PROJECTION_KEYS) <= set(tensors):
            raise PeftkitError("the VeRA adapter says save_projection but its file lacks base_model.vera_A / "
                               "vera_B; set save_projection false in adapter_config.json to redraw them from the key")
        inject(model, config, adapter_name)
        layers = _layers(model, adapter_name)
        wanted = {f"{PEFT_PREFIX}{p}.{kind}": getattr(m, kind)[adapter_name]
                  for p, m in layers for kind in ("vera_lambda_b", "vera_lambda_d")}
        shared = layers[0][1].projections
        if config.save_projection:
            wanted.update(zip(PROJECTION_KEYS, (shared.vera_A, shared.vera_B), strict=True))
        copy_saved_tensors("VeRA", wanted, tensors)
        return config

    def saved_activations(self, config: VeraConfig, shape: ModelShape, act_bytes: int, seq_len: int) -> SavedActivations:
        """A_s's and B_s's outputs per adapted layer, a (r + d_out) bytes per token (module docstring); dropout
        adds its mask and its output, (1 + a) d_in."""
        targets = shape.default_targets if config.target_modules is None else config.target_modules
        saved = 0
        for name in shape.target_linears(targets):
            linear = shape.linear(name)
            saved += act_bytes * (config.r + linear.d_out)
            saved += (1 + act_bytes) * linear.d_in if config.vera_dropout > 0 else 0
        return SavedActivations(per_layer=saved)


register(VeraMethod())

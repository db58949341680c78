"""OFT's registry entry: injection, HF PEFT 0.21.2's format both ways, and what it saves for backward.

On disk (peft_type "OFT"): one tensor per adapted module, `base_model.model.<path>.oft_R.weight`, shape
[r, b(b-1)/2] ([1, b(b-1)/2] with block_share), and the OFTConfig fields as PEFT writes them. PEFT <= 0.15 saved
another format (`oft_r`, no oft_block_size), which PEFT 0.21 refuses too.

Trainable parameters per adapted module: r b(b-1)/2 (b(b-1)/2 with block_share), r = d_in / b.

Saved for backward, bytes per token per layer (a: bytes of the compute dtype): the rotation's input, once per
distinct input (q / k / v share theirs: a h; gate / up theirs: a h; down_proj's: a i; o_proj's: a n_h d), since
the rotated input goes into a frozen linear, which saves nothing. Computing each rotation saves a few r b^2 = d_in b
tensors (Q and the series' powers, or the solve's factors, and the blocks): per layer, not per token
(`SavedActivations.weights_per_layer`; about 1% of the activations at b = 32 and 512 tokens).
"""

from __future__ import annotations

import re
from typing import Any, cast

import torch
from torch import nn

from peftkit.core.archs import LINEAR_TYPES
from peftkit.core.inject import base_modules, find_targets, inject, refuse_unsupported_fields, replace_module
from peftkit.core.method import PEFT_PREFIX, Method
from peftkit.core.registry import register
from peftkit.core.shapes import ModelShape, SavedActivations
from peftkit.core.state import adapters
from peftkit.errors import PeftkitError
from peftkit.methods.lora.format import target_modules_for
from peftkit.methods.oft.config import OFTConfig
from peftkit.methods.oft.layer import OftLayer, Rotation, in_features

_KEY = re.compile(r"^(?P<path>.+)\.oft_R(?:\.[^.]+)?\.weight$")  # PEFT strips the adapter name; older files kept it
CONFIG_FIELDS = ("r", "oft_block_size", "module_dropout", "coft", "eps", "block_share", "use_cayley_neumann",
                 "num_cayley_neumann_terms", "init_weights")


class OftMethod(Method):
    """Registry entry for OFT (`--method oft`)."""

    name = "oft"
    peft_type = "OFT"
    config_cls = OFTConfig
    mergeable = True
    option_fields = {"rank": "r", "target_modules": "target_modules"}
    peft_refuses_conv1d = True  # its config's fan_in_fan_out says the layers are GPT-2's Conv1D
    default_lr = 2e-4  # LoRA's: on the bundled task OFT trains at the 2e-3 LoRA gets there (10x this)

    def inject(self, model: nn.Module, config: OFTConfig, adapter_name: str) -> None:
        """Wrap every targeted linear in an OftLayer (or add to one); every block size is checked first, so a width
        the config does not divide leaves the model untouched."""
        paths = find_targets(model, config.target_modules, config.layers_to_transform)
        rotations = {path: _rotation(config, path, in_features(model.get_submodule(path))) for path in paths}
        for path, rotation in rotations.items():
            module = model.get_submodule(path)
            if not isinstance(module, OftLayer):
                module = OftLayer(module)
                replace_module(model, path, module)
            module.add_adapter(adapter_name, rotation, config.init_weights)

    def export(self, model: nn.Module, adapter_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """PEFT's OFT layout: one `oft_R.weight` per adapted module, the config as PEFT 0.21.2 writes it."""
        config: OFTConfig = adapters(model)[adapter_name].config
        layers = _oft_layers(model, adapter_name)
        tensors = {f"{PEFT_PREFIX}{p}.oft_R.weight": m.oft_R[adapter_name].detach().contiguous() for p, m in layers}
        linears = [p for p, m in base_modules(model) if isinstance(getattr(m, "base_layer", m), LINEAR_TYPES)]
        config_json: dict[str, Any] = {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM",
            **{f: getattr(config, f) for f in CONFIG_FIELDS},
            "target_modules": target_modules_for([p for p, _ in layers], adaptable=linears),
            "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers), "bias": "none", "exclude_modules": None,
            "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None, "inference_mode": True,
            "revision": None,
            # the Cayley-Neumann series changed in PEFT 0.18; PEFT warns on files without a version, and this one
            # computes it as 0.21.2 does
            "peft_version": "0.21.2",
        }
        return config_json, tensors

    def load(self, model: nn.Module, config_json: dict, tensors: dict[str, torch.Tensor], adapter_name: str) -> OFTConfig:
        """Inject an OFT adapter saved by peftkit or HF PEFT and copy its tensors in (every key and shape checked
        before anything is injected)."""
        refuse_unsupported_fields(config_json, self.peft_type or self.name)
        keys = _parse_keys(tensors)
        config = _config_from_json(config_json, list(keys))
        modules = dict(base_modules(model))
        for path, key in keys.items():
            base = getattr(modules.get(path), "base_layer", modules.get(path))
            if not isinstance(base, LINEAR_TYPES):
                raise PeftkitError(f"OFT tensor {key!r} targets module {path!r}, which is not a linear layer of this "
                                   "model (was the adapter trained for another base model?)")
            rotation = _rotation(config, path, in_features(base))
            if tuple(tensors[key].shape) != rotation.shape:
                raise PeftkitError(f"OFT tensor {key!r} has shape {tuple(tensors[key].shape)}, the model needs "
                                   f"{rotation.shape} (block size {rotation.block}); the adapter does not fit this model")
        inject(model, config, adapter_name)
        with torch.no_grad():
            for path, key in keys.items():
                cast(OftLayer, model.get_submodule(path)).oft_R[adapter_name].copy_(tensors[key])
        return config

    def saved_activations(self, config: OFTConfig, shape: ModelShape, act_bytes: int, seq_len: int) -> SavedActivations:
        """The rotations' inputs, once per distinct input, per token; the rotations' own series, per layer
        (module docstring)."""
        names = shape.target_linears(shape.default_targets if config.target_modules is None else config.target_modules)
        inputs = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}
        widths = {inputs.get(n, n): shape.linear(n).d_in for n in names}
        blocks = sum(shape.linear(n).d_in * config.block_size(n, shape.linear(n).d_in) for n in names)  # r b^2 each
        chain = act_bytes * _chain_tensors(config) * blocks
        return SavedActivations(per_layer=act_bytes * sum(widths.values()), weights_per_layer=chain)


def _chain_tensors(config: OFTConfig) -> int:
    """About how many r x b x b tensors computing one layer's rotation saves for backward: Q and the powers the
    Neumann series multiplies (autocast adds bf16 copies), or the solve's factors and result, and the blocks the
    input product reads."""
    terms = config.num_cayley_neumann_terms
    return 1 + (3 if not config.use_cayley_neumann else max(terms - 1, 3) if terms > 2 else 1)


def _rotation(config: OFTConfig, path: str, width: int) -> Rotation:
    """The rotation `config` gives the layer at `path` (its block size checked against the layer's width)."""
    block = config.block_size(path, width)
    return Rotation(block=block, blocks=width // block, shared=config.block_share,
                    neumann_terms=config.num_cayley_neumann_terms if config.use_cayley_neumann else None,
                    coft_eps=config.eps if config.coft else None, dropout=config.module_dropout)


def _oft_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, OftLayer]]:
    """(path, layer) for every OftLayer that holds `adapter_name`."""
    return [(p, m) for p, m in base_modules(model) if isinstance(m, OftLayer) and adapter_name in m.oft_R]


def _parse_keys(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """{module path: key} from the saved keys; a key that is not an OFT rotation is an error."""
    out = {}
    for key in tensors:
        match = _KEY.match(key)
        if match is None:
            old = ".oft_r." in key
            raise PeftkitError(f"adapter tensor {key!r} is not an OFT rotation (<module>.oft_R.weight)"
                               + ("; it is PEFT <= 0.15's OFT format, which PEFT 0.21 no longer loads either: retrain"
                                  if old else "; peftkit loads every tensor or refuses the file"))
        path = match["path"]
        out[path[len(PEFT_PREFIX):] if path.startswith(PEFT_PREFIX) else path] = key
    return out


def _config_from_json(config_json: dict, paths: list[str]) -> OFTConfig:
    """The OFTConfig of a saved adapter, targeting exactly the saved modules."""
    if "oft_block_size" not in config_json:
        raise PeftkitError("the OFT adapter_config.json has no oft_block_size: it is PEFT <= 0.13's format, which "
                           "PEFT 0.21 no longer loads either; retrain the adapter")
    fields = {f: config_json[f] for f in CONFIG_FIELDS if config_json.get(f) is not None}
    target = "^(" + "|".join(re.escape(p) for p in paths) + ")$"
    try:
        return OFTConfig(**fields, bias=config_json.get("bias") or "none", target_modules=target)
    except TypeError as exc:
        raise PeftkitError(f"invalid OFT adapter_config.json: {exc}") from None


register(OftMethod())

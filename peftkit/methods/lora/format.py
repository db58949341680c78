"""Reading LoRA adapters saved in HF PEFT's format (by PEFT, mergekit, or peftkit) into a LoraConfig.

Unlike PEFT, nothing is dropped silently: the modules to adapt come from the tensor keys themselves, every key
must be understood, every module must exist in the model, and every shape must fit, before anything is injected.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from peftkit.core.archs import LINEAR_TYPES
from peftkit.errors import PeftkitError
from peftkit.core.inject import base_modules
from peftkit.core.method import PEFT_PREFIX
from peftkit.methods.lora.config import LoraConfig

# <path>.lora_A.weight, <path>.lora_B.weight, <path>.lora_B.bias; PEFT strips the adapter name but older files
# may keep it (<path>.lora_A.default.weight).
_KEY = re.compile(r"^(?P<path>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.(?P<kind>weight|bias)$")


def parse_keys(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, str]]:
    """{module path: {"A": key, "B": key, "bias": key}} from the saved keys; unknown keys are an error."""
    out: dict[str, dict[str, str]] = {}
    missing_prefix = False
    for key in tensors:
        match = _KEY.match(key)
        if match is None or (match["part"] == "lora_A" and match["kind"] == "bias"):
            raise PeftkitError(
                f"adapter tensor {key!r} is not a LoRA weight (expected <module>.lora_A.weight / .lora_B.weight); "
                "peftkit loads every tensor or refuses the file"
            )
        path = match["path"]
        if path.startswith(PEFT_PREFIX):
            path = path[len(PEFT_PREFIX):]
        else:
            missing_prefix = True
        slot = "bias" if match["kind"] == "bias" else match["part"][-1]
        out.setdefault(path, {})[slot] = key
    if missing_prefix:
        warnings.warn(f"adapter keys lack the {PEFT_PREFIX!r} prefix (HF PEFT would load nothing); loaded them anyway")
    return out


def config_from_peft(
    model: nn.Module, config_json: dict, tensors: dict[str, torch.Tensor]
) -> tuple[LoraConfig, dict[str, dict[str, str]]]:
    """A LoraConfig that re-creates exactly the saved modules, after checking every tensor against the model."""
    keys = parse_keys(tensors)
    config = LoraConfig(
        r=int(config_json.get("r", 8)),
        lora_alpha=config_json.get("lora_alpha", 8),
        lora_dropout=float(config_json.get("lora_dropout") or 0.0),
        target_modules="^(" + "|".join(re.escape(p) for p in keys) + ")$",
        use_rslora=bool(config_json.get("use_rslora", False)),
        lora_bias=any("bias" in slots for slots in keys.values()),
        rank_pattern=dict(config_json.get("rank_pattern") or {}),
        alpha_pattern=dict(config_json.get("alpha_pattern") or {}),
    )
    if config.lora_bias and not config_json.get("lora_bias"):
        warnings.warn("the adapter has lora_B.bias tensors but lora_bias is false; peftkit applies them (PEFT drops them)")
    _check_shapes(model, config, tensors, keys)
    return config, keys


def _check_shapes(model: nn.Module, config: LoraConfig, tensors: dict, keys: dict[str, dict[str, str]]) -> None:
    """Every module must exist and be linear; A must be [r, d_in], B [d_out, r], B's bias [d_out]."""
    modules = dict(base_modules(model))
    for path, slots in keys.items():
        if "A" not in slots or "B" not in slots:
            raise PeftkitError(f"adapter has only one of lora_A / lora_B for module {path!r}; the file is incomplete")
        module = modules.get(path)
        base = getattr(module, "base_layer", module)
        if not isinstance(base, LINEAR_TYPES):
            what = "does not exist in" if module is None else f"is a {type(base).__name__} in"
            raise PeftkitError(
                f"adapter tensor {slots['A']!r} targets module {path!r}, which {what} this model "
                "(was the adapter trained for another base model?)"
            )
        w = base.weight
        d_out, d_in = (w.shape[1], w.shape[0]) if not isinstance(base, nn.Linear) else tuple(w.shape)
        r, _ = config.rank_alpha(path)
        expected = {"A": (r, d_in), "B": (d_out, r), "bias": (d_out,)}
        for slot, key in slots.items():
            if tuple(tensors[key].shape) != expected[slot]:
                raise PeftkitError(
                    f"adapter tensor {key!r} has shape {tuple(tensors[key].shape)} but the model needs "
                    f"{expected[slot]} (r={r}, module {d_in}->{d_out}); the adapter does not fit this model"
                )


def load_lora_tensors(model: nn.Module, tensors: dict, keys: dict[str, dict[str, str]], name: str) -> None:
    """Copy the checked tensors into the freshly injected adapter `name`."""
    with torch.no_grad():
        for path, slots in keys.items():
            layer = model.get_submodule(path)
            layer.lora_A[name].weight.copy_(tensors[slots["A"]])
            layer.lora_B[name].weight.copy_(tensors[slots["B"]])
            if "bias" in slots:
                layer.lora_B[name].bias.copy_(tensors[slots["bias"]])

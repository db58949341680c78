"""Helpers of the DoRA tests: trained-like DoRA adapters (random A, B and a positive magnitude)."""

from __future__ import annotations

from pathlib import Path

import torch

import peftkit
from tests.tiny import perturb_adapter, tiny_model

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "k_proj", "v_proj"],
           "gpt2": ["c_attn", "c_proj"]}


def perturb_dora(model: torch.nn.Module, seed: int = 2) -> None:
    """Random A and B, and each magnitude m set to ‖W‖_row * |1 + 0.2 N(0, 1)| (positive, not its initial norm), as
    training would leave them. Works on peftkit's and on PEFT's modules."""
    perturb_adapter(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            for param in getattr(module, "lora_magnitude_vector", {}).values():
                param = getattr(param, "weight", param)  # PEFT keeps m in a module's .weight
                norm = module.base_layer.weight.float().norm(dim=0 if module.fan_in_fan_out else 1)
                param.copy_(norm * (1 + 0.2 * torch.randn(param.shape, generator=g)).abs())


def dora_model(kind: str, seed: int = 2, **config) -> torch.nn.Module:
    """Tiny model `kind` with a perturbed DoRA adapter (r=4, alpha=8) on the TARGETS of its family."""
    model = tiny_model(kind)
    options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[kind], "use_dora": True, **config}
    peftkit.inject(model, peftkit.LoraConfig(**options))
    perturb_dora(model, seed)
    return model


def save_dora(kind: str, folder: Path, seed: int = 2, **config) -> Path:
    peftkit.save_adapter(dora_model(kind, seed, **config), folder)
    return folder

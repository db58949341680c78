"""Helpers shared by the merge / combine / compress tests: tiny checkpoints and adapters on disk."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import peftkit
from tests.tiny import perturb_adapter, tiny_model


def save_base(kind: str, folder: Path, shard: str | None = None) -> Path:
    """Save tiny model `kind` (seed 0) to `folder`, sharded when `shard` (e.g. "20KB") is given."""
    model = tiny_model(kind)
    model.save_pretrained(folder, max_shard_size=shard) if shard else model.save_pretrained(folder)
    return folder


def save_lora(kind: str, folder: Path, seed: int = 2, **config) -> Path:
    """A LoRA adapter with random (trained-like) A and B for tiny model `kind`, saved in PEFT format."""
    model = tiny_model(kind)
    peftkit.inject(model, peftkit.LoraConfig(**{"r": 4, "target_modules": "all-linear", **config}))
    perturb_adapter(model, seed=seed)
    peftkit.save_adapter(model, folder)
    return folder


def load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest absolute difference over the parameters both models have (by name)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert set(pa) == set(pb), set(pa) ^ set(pb)
    return max(float((pa[k].detach().float() - pb[k].detach().float()).abs().max()) for k in pa)

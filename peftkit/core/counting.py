"""Parameter counts of a method on a model config, computed on the meta device (no memory, any model size).

The model is built from its config on the meta device, the method is injected through the registry exactly as in
training, and the parameters are counted; so counts always agree with what `inject` really creates.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from peftkit.core.ops import trainable_parameters
from peftkit.core.inject import inject
from peftkit.core.registry import get_method


def meta_model(model_config: PretrainedConfig) -> torch.nn.Module:
    """The CausalLM for `model_config` with every tensor on the meta device (shapes only)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def count_parameters(model_config: PretrainedConfig, method: str, **options: Any) -> tuple[int, int]:
    """(trainable, total) parameters when `method` with CLI-style `options` is applied to `model_config`.

    `method="full"` counts every parameter as trainable. Options use the shared CLI names (rank, alpha,
    target_modules, ...) or the method config's field names.
    """
    model = meta_model(model_config)
    if method == "full":
        total = sum(p.numel() for p in model.parameters())
        return total, total
    inject(model, get_method(method).build_config(options))
    return trainable_parameters(model)

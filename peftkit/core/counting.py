"""Parameter counts: of a model, and of a method on a model config computed on the meta device (no memory, any
model size).

The model is built from its config on the meta device, the method is applied through the registry exactly as in
training (`apply_method`), and the parameters are counted; so counts always agree with what training creates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from peftkit.core.inject import apply_method

if TYPE_CHECKING:  # a runtime import of PreTrainedModel loads transformers' modeling code (~2.5 s)
    from transformers import PreTrainedModel


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared (tied) tensors counted once, as PEFT prints them. A parameter
    partitioned by DeepSpeed ZeRO-3 (loaded inside `zero.Init`: an empty local tensor) counts its whole size."""
    trainable = total = 0
    for param in model.parameters():
        size = getattr(param, "ds_numel", param.numel())
        total += size
        if param.requires_grad:
            trainable += size
    return trainable, total


def meta_model(model_config: PretrainedConfig) -> PreTrainedModel:
    """The CausalLM for `model_config` with every tensor on the meta device (shapes only)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def count_parameters(model_config: PretrainedConfig, method: str, **options: Any) -> tuple[int, int]:
    """(trainable, total) parameters when `method` with CLI-style `options` is applied to `model_config`.

    Options use the shared CLI names (rank, alpha, target_modules, ...) or the method config's field names.
    """
    model = meta_model(model_config)
    apply_method(model, method, options)
    return trainable_parameters(model)

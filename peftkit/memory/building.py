"""Build a model for a `TrainingSetup` on the meta device: method applied, dtypes set, nothing allocated.

Shared by the trace (step_trace.py, which then materializes the parameters as fake tensors) and by the parameter counts of the
analytic estimator. Every method is applied through the registry (`peftkit.core.inject.apply_method`), exactly as
the trainer applies it, so the counts and the traced modules are those of the real method code.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from peftkit.core.inject import apply_method
from peftkit.memory.training_setup import TrainingSetup

if TYPE_CHECKING:  # a runtime import of PreTrainedModel loads transformers' modeling code (~2.5 s)
    from transformers import PreTrainedModel


def build_meta_model(config: PretrainedConfig, setup: TrainingSetup) -> PreTrainedModel:
    """The HF causal LM for `config` on the meta device with `setup`'s method applied and dtypes set.

    dtypes: fp32 -> all fp32; bf16 -> all bf16; amp -> trainable fp32, frozen bf16 (see `training_setup.py`).
    """
    with torch.device("meta"), warnings.catch_warnings(), _without_zero3():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        apply_method(model, setup.method, setup.method_options)
    frozen_dtype = torch.float32 if setup.precision == "fp32" else torch.bfloat16
    trainable_dtype = torch.bfloat16 if setup.precision == "bf16" else torch.float32
    for p in model.parameters():
        p.data = p.data.to(trainable_dtype if p.requires_grad else frozen_dtype)
    return model


@contextmanager
def _without_zero3() -> Iterator[None]:
    """Inside: transformers sees no DeepSpeed config. A `--deepspeed zero3` run registers one (accelerate's plugin),
    and transformers then builds every model inside ZeRO-3's `zero.Init` and re-initialises its weights, which a
    meta model (shapes only) cannot do; the estimator's model is never trained, so it is built plainly."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered

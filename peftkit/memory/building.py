"""Build a model for a `TrainingSetup` on the meta device: method applied, dtypes set, nothing allocated.

Shared by the trace (step_trace.py, which then materializes the parameters as fake tensors) and by the parameter counts of the
analytic estimator. Every method is applied through the registry (`peftkit.core.inject.apply_method`), exactly as
the trainer applies it, so the counts and the traced modules are those of the real method code.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from peftkit.core.counting import trainable_parameters
from peftkit.core.inject import apply_method
from peftkit.core.registry import get_method
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


_COUNTS: dict[tuple[str, int, str], tuple[int, int]] = {}


def parameter_counts(config: PretrainedConfig, setup: TrainingSetup) -> tuple[int, int]:
    """(trainable, total) parameters of `setup`'s method on `config` (`build_meta_model`), built once per process for
    each model, method and options: the counts do not depend on the precision, batch or sequence, and the web page's
    plan, the estimator's searches and its tests ask for the same ones again (a 72B build takes ~0.1-0.4 s)."""
    key = (config.to_json_string(), id(get_method(setup.method)), json.dumps(setup.method_options, sort_keys=True,
                                                                             default=repr))
    if key not in _COUNTS:
        _COUNTS[key] = trainable_parameters(build_meta_model(config, setup))
    return _COUNTS[key]


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

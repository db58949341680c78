"""Trainable-parameter counts from the methods' textbook formulas (tests check them against the registered code).

    full     every parameter
    freeze   N * (parameters of one decoder layer)              (the last N layers train)
    lora     L * sum over targets of r * (d_in + d_out)         (Hu et al. 2021; A is r x d_in, B is d_out x r)
    adapter  per adapter 2*h*m + m + h, m = h // reduction_factor (Houlsby et al. 2019); houlsby: 2 per layer,
             pfeiffer / parallel: 1 per layer
    prefix   P * L * 2 * n_kv * d                                (Li & Liang 2021; K and V per layer, GQA-aware)
    prompt   P * h                                               (Lester et al. 2021; one embedding per token)
"""

from __future__ import annotations

from peftkit.errors import PeftkitError
from peftkit.memory.shapes import ModelShape
from peftkit.memory.training_setup import TrainingSetup

DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")


def lora_targets(shape: ModelShape, setup: TrainingSetup) -> list[str]:
    """Names of the linears LoRA wraps in every layer ("all-linear" = all of them)."""
    targets = setup.option("target_modules", DEFAULT_LORA_TARGETS)
    if isinstance(targets, str):
        targets = [targets] if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    names = [lin.name for lin in shape.linears]
    if list(targets) == ["all-linear"]:
        return names
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise PeftkitError(f"target modules {unknown} are not linears of this model; it has: {', '.join(names)}")
    return list(targets)


def analytic_trainable(shape: ModelShape, setup: TrainingSetup) -> int:
    """Trainable parameters of `setup.method` on `shape` (formulas in the module docstring)."""
    if setup.method == "full":
        return shape.total_params
    if setup.method == "freeze":
        n = setup.option("layers", 2)
        if n > shape.layers:
            raise PeftkitError(f"freeze layers={n} but the model has {shape.layers} decoder layers")
        return n * shape.layer_params
    if setup.method in ("lora", "qlora"):
        r = setup.option("r", 8)
        per_layer = sum(r * (shape.linear(t).d_in + shape.linear(t).d_out) for t in lora_targets(shape, setup))
        return shape.layers * per_layer
    if setup.method == "adapter":
        rf = setup.option("reduction_factor", 16)
        if rf > shape.hidden:
            raise PeftkitError(f"reduction_factor {rf} is larger than the hidden size {shape.hidden}")
        m = shape.hidden // rf
        count = 2 if setup.option("variant", "houlsby") == "houlsby" else 1
        return shape.layers * count * (2 * shape.hidden * m + m + shape.hidden)
    if setup.method == "prefix":
        return setup.option("num_virtual_tokens", 20) * shape.layers * 2 * shape.kv_dim
    if setup.method == "prompt":
        return setup.option("num_virtual_tokens", 20) * shape.hidden
    raise PeftkitError(f"unknown method {setup.method!r}")

"""`estimate_memory(...) -> MemoryEstimate`: the Python entry point of the estimator (the CLI calls only this).

Units: every `*_bytes` field is bytes; `gpu_memory_gb` is in GB = 10^9 bytes (what GPU vendors print: an "80 GB"
GPU has 80e9 bytes, ~74.5 GiB).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from transformers import PretrainedConfig

from peftkit.core.shapes import ModelShape, model_shape
from peftkit.errors import PeftkitError
from peftkit.io.deepspeed import deepspeed_stage
from peftkit.memory.analytic import ROWS, Analytic, estimate_rows
from peftkit.memory.building import parameter_counts
from peftkit.memory.generation import Rollout
from peftkit.memory.presets import resolve_config
from peftkit.memory.training_setup import TrainingSetup

GB = 1e9
MAX_GPUS = 4096


@dataclass
class MemoryEstimate:
    """The estimate for one run: a breakdown per GPU (bytes), the total, and the answers users want.

    `breakdown` has the rows frozen_weights, trainable_weights, gradients, optimizer_states, activations,
    logits_and_loss, step_temporaries, overhead (their sum is `total_bytes`); `peak_phase` says when the peak
    happens. `rollout` (an objective that samples, `setup.rollout`): the KV cache, merged-weight copy, sampled
    logits, prefill transient and reference pass, and each phase's tensor total. `gpus_needed` is the smallest GPU count of `gpu_memory_gb` that holds the run with its sharding
    (None when no count does: plain data parallel never lowers per-GPU memory). `max_batch_size` / `max_seq_len`
    are the largest that fit one GPU of `gpu_memory_gb` with the other settings unchanged (0 when none fits).
    """

    model: str
    total_params: int
    trainable_params: int
    setup: dict[str, Any]
    breakdown: dict[str, int]
    total_bytes: int
    peak_phase: str
    cpu_offload_bytes: int = 0
    gpu_memory_gb: float | None = None
    fits: bool | None = None
    gpus_needed: int | None = None
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    assumptions: list[str] = field(default_factory=list)
    trace: dict[str, Any] | None = None
    rollout: dict[str, int] | None = None  # an objective that samples: its terms and phases (bytes)
    units: str = "bytes; GB = 1e9 bytes"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rows(shape: ModelShape, setup: TrainingSetup, trainable: int, total: int) -> Analytic:
    return estimate_rows(shape, setup, trainable, total)


def _largest(fits, start: int, limit: int) -> int:
    """Largest x in [1, limit] with fits(x) (fits is monotone decreasing); 0 when fits(1) is false."""
    if not fits(1):
        return 0
    lo, hi = 1, max(start, 1)
    while hi < limit and fits(hi):
        lo, hi = hi, min(hi * 2, limit)
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def estimate_memory(
    model: str | PretrainedConfig | dict,
    method: str = "full",
    *,
    precision: str = "amp",
    optimizer: str = "adamw",
    batch_size: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = False,
    gpus: int = 1,
    deepspeed: str | None = None,
    fsdp: bool = False,
    offload: bool = False,
    gpu_memory_gb: float | None = None,
    rollout: Rollout | None = None,
    **method_options: Any,
) -> MemoryEstimate:
    """Estimate per-GPU memory of one training step (analytic model, analytic.py); see `MemoryEstimate`.

    `method`: a registered method (built-in or plugin). `method_options`: fields of its config (or their CLI names,
    `Method.field_options`), e.g. r, target_modules, bits, reduction_factor, variant, num_virtual_tokens, layers;
    the config's own defaults fill the rest. An option that does not apply to the method, a value its config
    refuses or an unknown preset raises PeftkitError. Sharding is spelled as in `peftkit train`:
    `fsdp=True` (FSDP2 full shard) or `deepspeed="zero1" | "zero2" | "zero3" | "<DeepSpeed config>.json"`.
    `rollout`: an objective that samples before each step (its `Objective.rollout`; `batch_size` then counts the
    rows trained per micro-batch, completions included).
    """
    if gpu_memory_gb is not None and not 0 < gpu_memory_gb <= 1e6:  # also refuses nan and inf
        raise PeftkitError(f"gpu-memory must be a number of GB in (0, 1,000,000], got {gpu_memory_gb!r}")
    opts = {k: v for k, v in method_options.items() if v is not None}
    setup = TrainingSetup(method, precision, optimizer, batch_size, seq_len, gradient_checkpointing, gpus,
                          deepspeed_stage(deepspeed), fsdp, offload, opts, rollout)  # fmt: skip
    config, label = resolve_config(model)
    shape = model_shape(config)
    trainable, total = parameter_counts(config, setup)
    result = _rows(shape, setup, trainable, total)
    est = MemoryEstimate(label, total, trainable, asdict(setup), result.rows, result.total,
                         result.peak_phase, result.cpu_offload, gpu_memory_gb)  # fmt: skip
    est.assumptions = assumptions(setup)
    if result.rollout:
        est.rollout = {**result.rollout, **{f"phase/{k}": v for k, v in result.phase_totals.items()}}
    if gpu_memory_gb is not None:
        budget = gpu_memory_gb * GB
        est.fits = result.total <= budget
        est.gpus_needed = _gpus_needed(shape, setup, trainable, total, budget)

        def one(**changes: Any) -> bool:
            return _rows(shape, replace(setup, **changes), trainable, total).total <= budget

        est.max_batch_size = _largest(lambda b: one(batch_size=b), setup.batch_size, 1 << 16)
        est.max_seq_len = _largest(lambda n: one(seq_len=n), setup.seq_len, 1 << 22)
    return est


def _gpus_needed(shape: ModelShape, setup: TrainingSetup, trainable: int, total: int, budget: float) -> int | None:
    """Smallest N with per-GPU total <= budget under `setup`'s sharding (None if no N up to MAX_GPUS does)."""
    if setup.shard_stage == 0:
        return setup.gpus if _rows(shape, setup, trainable, total).total <= budget else None

    def fits(n: int) -> bool:
        return _rows(shape, replace(setup, gpus=n), trainable, total).total <= budget

    n = 1
    while n <= MAX_GPUS and not fits(n):
        n *= 2
    if n > MAX_GPUS:
        return None
    lo = n // 2
    while n - lo > 1:
        mid = (lo + n) // 2
        lo, n = (lo, mid) if fits(mid) else (mid, n)
    return n


def assumptions(setup: TrainingSetup) -> list[str]:
    """The modelling choices behind the figures, stated so users can check them against their trainer."""
    out = ["SDPA flash/memory-efficient attention (no S x S matrix); unpadded rows of seq_len tokens",
           "HF loss: logits upcast to fp32, log_softmax saved; only the loss kept from the model output",
           "overhead: 0.75 GB CUDA context + 5% caching-allocator slack (not measured here: no GPU)"]  # fmt: skip
    if setup.precision == "amp":
        out.append("amp: trainable weights fp32 (master), frozen weights bf16, bf16 autocast")
    if setup.optimizer == "adamw" and setup.zero == 0:
        out.append("AdamW foreach (CUDA default): +1 copy of the trainable weights during the step")
    if setup.zero:
        out.append(f"DeepSpeed ZeRO-{setup.zero}: bf16 working weights/grads, fp32 master with the optimizer states")
    if setup.fsdp:
        out.append("FSDP full shard: fp32 shards, bf16 compute (MixedPrecision), 2 layers gathered at a time")
    if setup.rollout is not None:
        out.append(f"rollouts: {setup.rollout.rows} rows ({setup.rollout.prompts} prompts x "
                   f"{setup.rollout.generations}) decoded at once with a KV cache of seq_len positions; the update "
                   f"scores {setup.rollout.new_tokens + 1} positions per row")
    return out


__all__ = ["MemoryEstimate", "estimate_memory", "ROWS"]

"""The `--trace` path: run the fake-tensor trace for an estimate's setup and add the corrections a CPU trace
cannot see, saying which were applied.

traced total = traced tensor peak (exact, one device, AdamW foreach traced as on CUDA)
             + CUDA context (0.75 GB)                     -- not a tensor: no trace sees it
             + 5% caching-allocator slack on the peak     -- rounding to 512-byte blocks / 2 MB segments, fragmentation
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from peftkit.memory.analytic import ALLOCATOR_SLACK, CUDA_CONTEXT
from peftkit.memory.estimate import GB, MemoryEstimate
from peftkit.memory.presets import resolve_config
from peftkit.memory.step_trace import TraceResult, trace_memory
from peftkit.memory.training_setup import TrainingSetup


def corrections(result: TraceResult) -> tuple[int, list[str]]:
    """(bytes to add to the traced peak, one line per correction applied)."""
    slack = ALLOCATOR_SLACK * result.peak_bytes
    lines = [f"+{CUDA_CONTEXT / GB:.2f} GB CUDA context and cuBLAS workspace",
             f"+{slack / GB:.2f} GB caching-allocator slack ({ALLOCATOR_SLACK:.0%} of the tensor peak)",
             "none for AdamW foreach: traced with foreach=True, the CUDA default (+1 copy of trainable weights)"]  # fmt: skip
    return int(CUDA_CONTEXT + slack), lines


def traced_estimate(model: Any, est: MemoryEstimate) -> MemoryEstimate:
    """`est` (of `model`) with a `trace` entry: the traced peak, its phase, per-phase figures and the corrected
    total, for exactly the setup `est` was computed for."""
    config, _ = resolve_config(model)
    result = trace_memory(config, TrainingSetup(**est.setup))
    extra, lines = corrections(result)
    trace = {"peak_bytes": result.peak_bytes, "peak_phase": result.peak_phase, "phases": result.phases,
             "state_bytes": result.state_bytes, "seconds": round(result.seconds, 2), "corrections": lines,
             "total_bytes": result.peak_bytes + extra, "assumptions": result.assumptions}  # fmt: skip
    return replace(est, trace=trace)

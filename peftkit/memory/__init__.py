"""Memory estimation before launch: offline presets, an analytic model, and an exact fake-tensor trace.

    from peftkit.memory import estimate_memory
    est = estimate_memory("qwen1.5-7b", "lora", precision="bf16", seq_len=1024, gradient_checkpointing=True,
                          gpu_memory_gb=24)
    est.total_bytes, est.breakdown, est.fits

`trace_memory` (step_trace.py) runs one real training step on fake tensors for the exact tensor peak; the analytic
model (analytic.py, activations.py) is tested against it.
"""

from peftkit.memory.estimate import MemoryEstimate, estimate_memory
from peftkit.memory.presets import PRESETS, preset_names, resolve_config
from peftkit.memory.training_setup import TrainingSetup

__all__ = ["MemoryEstimate", "estimate_memory", "PRESETS", "preset_names", "resolve_config", "TrainingSetup"]

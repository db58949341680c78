"""The analytic memory model: bytes per GPU of one training step, row by row, at the step's peak.

Model states (bytes per parameter; Ψ_t trainable, Ψ_f frozen, N GPUs), following the ZeRO paper's accounting:
    weights     fp32 4, bf16 2; amp: trainable 4 (fp32 master), frozen 2; what the frozen weights take is the
                method's answer (`Method.frozen_weight_bytes`: qlora's quantized linears NF4 0.516, int8 1 + 4/d_in)
    gradients   as the trainable weights
    optimizer   AdamW 2 states in the parameter dtype (8 in fp32); 8-bit AdamW 2 + 8/256 (blockwise absmax);
                SGD with momentum 1 state
    step temps  torch's foreach AdamW holds 1 more copy of the trainable weights (sqrt of exp_avg_sq)
Sharding: ZeRO-1 divides optimizer states by N, ZeRO-2 also gradients, ZeRO-3 / FSDP also weights (plus the
gathered weights of the running and the prefetched layer). DeepSpeed's bf16 mixed precision keeps bf16 working
weights and gradients and puts the fp32 master copy with the sharded optimizer states (12 bytes: K = 12), and
casts the gradient partition to fp32 for its fused step (4/N; stage 3 one 1e9-element sub-group at a time). Offload moves optimizer states, master weights and
step temporaries (and at stage 3 the weights) to CPU memory.

The step's peak is the largest of: the end of the forward (saved activations + logits and loss), the loss's
backward (saved activations + 12 V bytes per token), the layers' backward (saved activations + one recomputed
layer under checkpointing + the gradients in flight in one layer), the end of the backward (all gradients) and
the optimizer step (gradients + step temporaries).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftkit.core.shapes import ModelShape
from peftkit.memory.activations import activation_bytes, logits_bytes, method_saved, model_seq_len, regime
from peftkit.memory.training_setup import TrainingSetup

CUDA_CONTEXT = 0.75e9  # CUDA context + cuBLAS workspaces of a PyTorch process (typical on A100/H100)
ALLOCATOR_SLACK = 0.05  # caching-allocator rounding and fragmentation, as a fraction of live tensor bytes
ZERO_BUCKET = 5e8  # DeepSpeed's default reduce/all-gather bucket, in elements
ZERO3_SUB_GROUP = 1e9  # DeepSpeed stage 3 default sub_group_size, in elements

ROWS = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states", "activations", "logits_and_loss",
        "step_temporaries", "overhead")  # fmt: skip


@dataclass(frozen=True)
class Analytic:
    """Rows in bytes per GPU at the peak, the phase of the peak, and what lives on the CPU when offloading."""

    rows: dict[str, int]
    peak_phase: str
    cpu_offload: int

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def _state(s: ModelShape, setup: TrainingSetup, trainable: int, total: int) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients, optimizer states and step temporaries (before offload)."""
    n, stage, prec = setup.gpus, setup.shard_stage, setup.precision
    frozen = total - trainable
    wt = {"fp32": 4, "bf16": 2, "amp": 4}[prec]
    wf = 4 if prec == "fp32" else 2
    deepspeed_amp = prec == "amp" and setup.zero > 0
    if deepspeed_amp:
        wt = 2  # bf16 working copy; the fp32 master goes with the optimizer states
    opt_per = {"adamw": 2 * wt, "adamw-8bit": 2 + 8 / 256, "sgd": wt}[setup.optimizer]
    step_per = wt if setup.optimizer == "adamw" else 0
    if deepspeed_amp:
        opt_per = {"adamw": 8, "adamw-8bit": 2 + 8 / 256, "sgd": 4}[setup.optimizer] + 4
        step_per = 4  # fp32 copy of the gradient partition for the fused step
    frozen_bytes = setup.registered_method.frozen_weight_bytes(setup.config, s, frozen, wf)
    out = {"frozen_weights": frozen_bytes, "trainable_weights": trainable * wt, "gradients": trainable * wt,
           "optimizer_states": trainable * opt_per, "step_temporaries": trainable * step_per}  # fmt: skip
    if stage >= 1:
        out["optimizer_states"] /= n
        out["step_temporaries"] /= n
    if stage >= 2:
        out["gradients"] /= n
    if stage >= 3:
        gathered = 2 * s.layer_params * (2 if prec != "fp32" else 4)  # running + prefetched layer, unsharded
        out["frozen_weights"] /= n
        out["trainable_weights"] /= n
        out["trainable_weights" if trainable > frozen else "frozen_weights"] += gathered
        if deepspeed_amp:  # stage 3 casts the gradients to fp32 one sub-group (1e9 elements) at a time
            out["step_temporaries"] = min(out["step_temporaries"], 4 * ZERO3_SUB_GROUP)
    return out


def estimate_rows(s: ModelShape, setup: TrainingSetup, trainable: int, total: int) -> Analytic:
    """The analytic breakdown of one step (see the module docstring for every term)."""
    state = _state(s, setup, trainable, total)
    cpu = 0.0
    if setup.offload:
        cpu = state["optimizer_states"] + state["step_temporaries"]
        state["optimizer_states"] = state["step_temporaries"] = 0
        if setup.shard_stage >= 3:
            cpu += state["trainable_weights"]
            state["trainable_weights"] = 0
    acts = activation_bytes(s, setup)
    fwd_logits, bwd_logits = logits_bytes(s, setup)
    r = regime(setup)
    tokens = setup.batch_size * model_seq_len(setup)
    layer_grads = r.a * tokens * (3 * s.mlp_width + 2 * s.hidden)  # a layer's activation gradients in flight
    layer_grads += method_saved(s, setup).weights_per_layer  # their gradient (LoRA on experts: of W + ΔW)
    if r.autocast_cache:
        layer_grads += 2 * s.hidden * s.mlp_width  # a bf16 weight gradient before its cast to fp32
    recompute = 0
    if setup.gradient_checkpointing:
        recompute = acts.one_layer + acts.weight_cache // max(s.layers, 1)
    after_forward = acts.saved - (acts.weight_cache if setup.gradient_checkpointing else 0)
    grads = state["gradients"]
    phases = {
        "forward": (acts.saved, fwd_logits, 0, 0),
        "backward (loss)": (after_forward, bwd_logits, 0, 0),
        "backward": (after_forward + recompute, 0, 0, layer_grads),
        "backward (end)": (0, 0, grads, layer_grads),
        "optimizer step": (0, 0, grads, state["step_temporaries"]),
    }
    base = state["frozen_weights"] + state["trainable_weights"] + state["optimizer_states"]
    phase = max(phases, key=lambda k: sum(phases[k]))
    act, logits, grad_live, temps = phases[phase]
    tensors = base + act + logits + grad_live + temps
    overhead = CUDA_CONTEXT + ALLOCATOR_SLACK * tensors
    if setup.zero:
        overhead += ZERO_BUCKET * 2 * (2 if setup.zero < 3 else 1)
    rows = {
        "frozen_weights": state["frozen_weights"],
        "trainable_weights": state["trainable_weights"],
        "gradients": grad_live,
        "optimizer_states": state["optimizer_states"],
        "activations": act,
        "logits_and_loss": logits,
        "step_temporaries": temps,
        "overhead": overhead,
    }
    return Analytic({k: int(round(v)) for k, v in rows.items()}, phase, int(cpu))

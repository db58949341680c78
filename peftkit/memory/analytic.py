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
the optimizer step (gradients + step temporaries), and, for an objective that samples (`TrainingSetup.rollout`,
generation.py), the rollout (the `generation` row: KV cache and merged-weight copy; the sampled logits; the
prefill's transient) and the no-grad reference pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from peftkit.core.shapes import ModelShape
from peftkit.memory import generation as gen
from peftkit.memory.activations import activation_bytes, logits_bytes, lora_targets, method_saved, model_seq_len, regime
from peftkit.memory.training_setup import TrainingSetup

CUDA_CONTEXT = 0.75e9  # CUDA context + cuBLAS workspaces of a PyTorch process (typical on A100/H100)
ALLOCATOR_SLACK = 0.05  # caching-allocator rounding and fragmentation, as a fraction of live tensor bytes
ZERO_BUCKET = 5e8  # DeepSpeed's default reduce/all-gather bucket, in elements
ZERO3_SUB_GROUP = 1e9  # DeepSpeed stage 3 default sub_group_size, in elements

Phase = tuple[float, float, float, float, float]  # activations, logits, gradients, step temporaries, generation
ROWS = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states", "activations", "logits_and_loss",
        "step_temporaries", "generation", "overhead")  # fmt: skip


@dataclass(frozen=True)
class Analytic:
    """Rows in bytes per GPU at the peak, the phase of the peak, and what lives on the CPU when offloading."""

    rows: dict[str, int]
    peak_phase: str
    cpu_offload: int
    phase_totals: dict[str, int] = field(default_factory=dict)  # tensor bytes of each phase (no overhead)
    rollout: dict[str, int] = field(default_factory=dict)        # an objective's sampling terms (generation.py)

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
    phases: dict[str, Phase] = {
        "forward": (acts.saved, fwd_logits, 0, 0, 0),
        "backward (loss)": (after_forward, bwd_logits, 0, 0, 0),
        "backward": (after_forward + recompute, 0, 0, layer_grads, 0),
        "backward (end)": (0, 0, grads, layer_grads, 0),
        "optimizer step": (0, 0, grads, state["step_temporaries"], 0),
    }
    frozen_bytes_per_param = 4 if setup.precision == "fp32" else 2
    rollout_phases, rollout_terms = _rollout_phases(s, setup, total - trainable, frozen_bytes_per_param, r.a)
    phases.update(rollout_phases)
    base = state["frozen_weights"] + state["trainable_weights"] + state["optimizer_states"]
    phase = max(phases, key=lambda k: sum(phases[k]))
    act, logits, grad_live, temps, generation = phases[phase]
    tensors = base + act + logits + grad_live + temps + generation
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
        "generation": generation,
        "overhead": overhead,
    }
    totals = {k: int(base + sum(v)) for k, v in phases.items()}
    return Analytic({k: int(round(v)) for k, v in rows.items()}, phase, int(cpu), totals, rollout_terms)


def _merged_copy_bytes(s: ModelShape, setup: TrainingSetup, frozen: int, bytes_per_param: int) -> float:
    """The adapted linears' base weights, kept whole while the adapter is merged for sampling: none when the
    rollout does not merge, the weights are sharded, or the method stores them quantized (smaller than their
    dtype: they cannot be merged into)."""
    rollout = setup.rollout
    method, config = setup.registered_method, setup.config
    if rollout is None or not rollout.merged or not method.mergeable or setup.shard_stage >= 3:
        return 0
    if method.frozen_weight_bytes(config, s, frozen, bytes_per_param) < frozen * bytes_per_param:
        return 0
    if not hasattr(config, "target_modules") or method.trains_base:
        return 0  # no adapted linears to merge into
    names = set(lora_targets(s, setup))
    return sum(lin.d_in * lin.d_out for lin in s.linears if lin.name in names) * s.layers * bytes_per_param


def _rollout_phases(s: ModelShape, setup: TrainingSetup, frozen: int, bytes_per_param: int,
                    a: int) -> tuple[dict[str, Phase], dict[str, int]]:
    """({phase: (activations, logits, gradients, step temporaries, generation)} of sampling and of the reference
    pass, {term: bytes} of the rollout for the report) (generation.py); both empty when the setup does not sample."""
    rollout = setup.rollout
    if rollout is None:
        return {}, {}
    terms = {"kv_cache": gen.kv_cache_bytes(s, rollout, setup.seq_len, a),
             "merged_copy": _merged_copy_bytes(s, setup, frozen, bytes_per_param),
             "sampled_logits": gen.sampled_logits_bytes(s, rollout, a),
             "prefill": gen.layer_transient_bytes(s, rollout.prompts, setup.seq_len, a)}
    prompts_cache = gen.kv_cache_bytes(s, replace(rollout, generations=1), setup.seq_len, a)
    grown = terms["kv_cache"] + terms["kv_cache"] // max(s.layers, 1)  # + one layer's K, V while appended to
    phases: dict[str, Phase] = {"rollout (prefill)": (terms["prefill"], 0, 0, 0, prompts_cache + terms["merged_copy"]),
              "rollout": (0, terms["sampled_logits"], 0, 0, grown + terms["merged_copy"])}
    if rollout.reference_pass:
        rows = setup.batch_size
        terms["reference_pass"] = (gen.layer_transient_bytes(s, rows, setup.seq_len, a)
                                   + gen.scored_logits_bytes(s, rows, rollout.new_tokens + 1, a))
        phases["reference pass"] = (0, terms["reference_pass"], 0, 0, 0)
    return phases, {k: int(v) for k, v in terms.items()}

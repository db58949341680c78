"""Activation memory of a Llama-style decoder in training: the tensors autograd saves, per token, per layer.

Counted from what each op saves for backward in HF's Llama/Qwen2/Mistral code with SDPA (flash / memory-efficient
kernels save q, k, v, the output and a fp32 log-sum-exp per head; no S x S matrix). Letters: h hidden, k = n_kv*d
(K/V width), i MLP size, n_h heads, a = bytes of the compute dtype (2 for bf16, 4 for fp32).

Trained decoder layer (every weight of the layer trainable), bytes per token per layer:
    pure fp32        32h + 8k + 16i + 4n_h + 8
    pure bf16        20h + 4k +  8i + 4n_h + 8
    amp (autocast)   30h + 4k +  8i + 4n_h + 8   + a bf16 copy of every linear weight (autocast's weight cache,
                                                  held until the end of the forward and saved for backward)
  RMSNorm saves its fp32 input (4h) and, with a trainable weight, its normalised input and its output (the
  linears' input); under autocast each linear saves its own bf16 cast of the input (q, k, v: 3 casts; gate, up: 2).
  SDPA saves q, k, v, out (2h + 2k elements) and 4 bytes per head; the MLP saves gate, silu(gate), up and their
  product (4i elements).
Frozen decoder layer whose input requires grad (a method that injects adapters): norms save only their fp32 input
(4h each; q / k norms, OLMoE's and Qwen3's, also 4 (n_h + n_kv) d); linears save nothing; the MLP saves gate,
silu(gate) and up (3i); SDPA as above; the method adds what its own modules save (`Method.saved_activations`:
per token, and weight-sized tensors per layer whatever the tokens).
A mixture-of-experts layer (transformers' grouped_mm experts; E experts, k per token, expert MLP i_e) instead of the
MLP: the router's fp32 softmax (4E) and top-k indices, and per routed copy of the token (k of them) gate, silu(gate),
up (3 a i_e), the expert output kept for the routing-weight product (a h), its weight and three int64 index tensors
(sort permutation, its inverse, the top-k index: 34 bytes); under amp the block's fp32 input costs 3h more
(measured on the trace: the bf16 run does not have it). A trained MoE layer counts its MLP as k * i_e wide.
Which layers train is the method's answer (`Method.trained_base`: full -> all, freeze -> the top N, whose lower
layers save nothing); how many positions run is the row plus `Method.extra_positions` (prompt tuning).
Gradient checkpointing keeps only each layer's input (residual dtype) and recomputes one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftkit.core.shapes import ModelShape, SavedActivations
from peftkit.memory.training_setup import TrainingSetup


def lora_targets(shape: ModelShape, setup: TrainingSetup) -> list[str]:
    """Names of the linears the setup's `target_modules` selects in every layer (the shape's default targets when
    unset; "all-linear" = all of them): what the textbook counts of tests/memory/test_presets.py multiply."""
    targets = getattr(setup.config, "target_modules", None)
    return shape.target_linears(shape.default_targets if targets is None else targets)


@dataclass(frozen=True)
class Regime:
    """How the forward computes: activation bytes `a`, residual-stream bytes, whether autocast caches weights, and
    whether autocast runs at all (`amp`)."""

    a: int
    residual: int
    autocast_cache: bool
    amp: bool = False


def regime(setup: TrainingSetup) -> Regime:
    """The compute regime of `setup`. Sharded amp (DeepSpeed bf16, FSDP MixedPrecision) computes in pure bf16;
    autocast caches bf16 copies only of trainable (fp32) base weights, so only when the method trains the base."""
    if setup.precision == "fp32":
        return Regime(4, 4, False)
    if setup.precision == "amp" and setup.registered_method.trains_base and setup.shard_stage == 0:
        return Regime(2, 4, True, amp=True)
    return Regime(2, 2, False, amp=setup.precision == "amp")


def full_layer(s: ModelShape, r: Regime) -> int:
    """Bytes per token per layer saved by a decoder layer whose weights are all trainable (formulas above)."""
    h, k, i = s.hidden, s.kv_dim, s.mlp_width
    sdpa = 4 * s.heads + 8  # log-sum-exp per head + two rsqrt per token
    if r.a == 4:
        return 32 * h + 8 * k + 16 * i + sdpa
    if r.autocast_cache:
        return 30 * h + 4 * k + 8 * i + sdpa
    return 20 * h + 4 * k + 8 * i + sdpa


def frozen_layer(s: ModelShape, r: Regime) -> int:
    """Bytes per token per layer saved by a frozen decoder layer whose input requires grad (adapter methods)."""
    h, k, i, a = s.hidden, s.kv_dim, s.intermediate, r.a
    norms = 2 * 4 * h + (4 * (s.heads + s.kv_heads) * s.head_dim if s.qk_norm else 0)
    attention = a * (2 * h + 2 * k) + 4 * s.heads
    return norms + attention + (moe_block(s, r) if s.experts else 3 * a * i) + 8


def moe_block(s: ModelShape, r: Regime) -> int:
    """Bytes per token a frozen mixture-of-experts block saves (module docstring): router, then k routed copies."""
    routed = 3 * r.a * s.expert_intermediate + r.a * s.hidden + 34
    return 4 * s.experts + s.top_k * routed + (3 * s.hidden if r.amp else 0)


def method_saved(s: ModelShape, setup: TrainingSetup) -> SavedActivations:
    """What the method's own modules save per token (`Method.saved_activations`, in the setup's compute dtype)."""
    return setup.registered_method.saved_activations(setup.config, s, regime(setup).a, setup.seq_len)


def per_layer_bytes(s: ModelShape, setup: TrainingSetup) -> list[int]:
    """Saved bytes per token of each decoder layer that saves anything (without checkpointing): every layer under
    an adapter method; the trained layers when the method trains the base (the ones below them save nothing)."""
    r = regime(setup)
    base = setup.registered_method.trained_base(setup.config, s)
    if base is not None:
        return [full_layer(s, r)] * base.layers
    return [frozen_layer(s, r) + method_saved(s, setup).per_layer] * s.layers


@dataclass(frozen=True)
class ActivationBytes:
    """Activation figures of one micro-batch: what the forward leaves saved, and one layer's share."""

    saved: int  # all layers' saved tensors at the end of the forward (checkpointing: the layer inputs)
    one_layer: int  # one layer's saved tensors (recomputed at once under checkpointing)
    weight_cache: int  # autocast's bf16 weight copies held during the forward (amp, unsharded)


def model_seq_len(setup: TrainingSetup) -> int:
    """Positions the decoder layers run over: the row and the method's extra positions (prompt tuning's virtual
    tokens; the logits of those positions are cut before the loss, so `logits_bytes` keeps `seq_len`)."""
    return setup.seq_len + setup.registered_method.extra_positions(setup.config)


def activation_bytes(s: ModelShape, setup: TrainingSetup) -> ActivationBytes:
    """Saved activations for `setup` (per-layer figures from `per_layer_bytes`, times the micro-batch's tokens)."""
    r = regime(setup)
    tokens = setup.batch_size * model_seq_len(setup)
    base = setup.registered_method.trained_base(setup.config, s)
    per_layer = per_layer_bytes(s, setup)
    final_norm = (12 if base is not None and base.whole else 4) * s.hidden + 4
    rotary = 2 * s.head_dim * r.a
    cache = 0
    if r.autocast_cache and base is not None:
        cache = 2 * sum(lin.d_in * lin.d_out for lin in s.linears) * base.layers
    method = method_saved(s, setup)
    weights = method.weights_per_layer if base is None else 0  # per layer, whatever the tokens
    if setup.gradient_checkpointing:
        saved = len(per_layer) * r.residual * s.hidden + final_norm + rotary
        held = 0  # only the recomputed layer holds its weight-sized tensors
    else:
        saved = sum(per_layer) + final_norm + rotary
        held = weights * len(per_layer)
    saved += method.once
    one_layer = max(per_layer, default=0) * tokens + weights
    return ActivationBytes(saved * tokens + cache + held, one_layer, cache)


def logits_bytes(s: ModelShape, setup: TrainingSetup) -> tuple[int, int]:
    """(forward peak, backward peak) of the logits and the loss, beyond the saved activations.

    HF's loss upcasts the logits to fp32 and log_softmax saves its fp32 output: the forward holds the logits
    (a bytes), their fp32 copy and the log-probabilities (4 + 4) at once: (a + 8) V bytes per token, with no extra
    copy in fp32 (8 V). The backward starts with the saved log-probabilities, the loss gradient and the
    log_softmax gradient: 12 V bytes per token. An objective that samples (`setup.rollout`) scores only the
    completion's positions.
    """
    positions = setup.seq_len if setup.rollout is None else setup.rollout.new_tokens + 1  # GRPO: logits_to_keep
    tokens = setup.batch_size * positions
    copy = 0 if regime(setup).a == 4 else 2
    return (copy + 8) * s.vocab * tokens, 12 * s.vocab * tokens

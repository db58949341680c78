"""Activation memory of a Llama-style decoder in training: the tensors autograd saves, per token, per layer.

Counted from what each op saves for backward in HF's Llama/Qwen2/Mistral code with SDPA (flash / memory-efficient
kernels save q, k, v, the output and a fp32 log-sum-exp per head; no S x S matrix). Letters: h hidden, k = n_kv*d
(K/V width), i MLP size, n_h heads, a = bytes of the compute dtype (2 for bf16, 4 for fp32).

Full fine-tune (every weight trainable), bytes per token per layer:
    pure fp32        32h + 8k + 16i + 4n_h + 8
    pure bf16        20h + 4k +  8i + 4n_h + 8
    amp (autocast)   30h + 4k +  8i + 4n_h + 8   + a bf16 copy of every linear weight (autocast's weight cache,
                                                  held until the end of the forward and saved for backward)
  RMSNorm saves its fp32 input (4h) and, with a trainable weight, its normalised input and its output (the
  linears' input); under autocast each linear saves its own bf16 cast of the input (q, k, v: 3 casts; gate, up: 2).
  SDPA saves q, k, v, out (2h + 2k elements) and 4 bytes per head; the MLP saves gate, silu(gate), up and their
  product (4i elements).
Frozen base (lora, qlora, adapter, prefix, prompt): norms save only their fp32 input (4h each); linears save nothing; the
MLP saves gate, silu(gate) and up (3i); SDPA as above; the method adds what its own modules save (see `peft_extra`).
Gradient checkpointing keeps only each layer's input (residual dtype) and recomputes one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

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



@dataclass(frozen=True)
class Regime:
    """How the forward computes: activation bytes `a`, residual-stream bytes, and whether autocast caches weights."""

    a: int
    residual: int
    autocast_cache: bool


def regime(setup: TrainingSetup) -> Regime:
    """The compute regime of `setup`. Sharded amp (DeepSpeed bf16, FSDP MixedPrecision) computes in pure bf16."""
    if setup.precision == "fp32":
        return Regime(4, 4, False)
    full_weights = setup.method in ("full", "freeze")
    if setup.precision == "amp" and full_weights and setup.shard_stage == 0:
        return Regime(2, 4, True)
    return Regime(2, 2, False)


def full_layer(s: ModelShape, r: Regime) -> int:
    """Bytes per token per layer saved by a decoder layer whose weights are all trainable (formulas above)."""
    h, k, i = s.hidden, s.kv_dim, s.intermediate
    sdpa = 4 * s.heads + 8  # log-sum-exp per head + two rsqrt per token
    if r.a == 4:
        return 32 * h + 8 * k + 16 * i + sdpa
    if r.autocast_cache:
        return 30 * h + 4 * k + 8 * i + sdpa
    return 20 * h + 4 * k + 8 * i + sdpa


def frozen_layer(s: ModelShape, r: Regime) -> int:
    """Bytes per token per layer saved by a frozen decoder layer whose input requires grad (PEFT methods)."""
    h, k, i, a = s.hidden, s.kv_dim, s.intermediate, r.a
    norms = 2 * 4 * h
    attention = a * (2 * h + 2 * k) + 4 * s.heads
    return norms + attention + 3 * a * i + 8


def peft_extra(s: ModelShape, setup: TrainingSetup, r: Regime) -> int:
    """Bytes per token per layer that the method's own modules save (inputs of its trainable projections)."""
    a, h = r.a, s.hidden
    if setup.method in ("lora", "qlora"):
        targets = set(lora_targets(s, setup))
        rank = setup.option("r", 8)
        saved = a * h if targets & {"q_proj", "k_proj", "v_proj"} else 0  # shared input of q/k/v
        saved += a * h if targets & {"gate_proj", "up_proj"} else 0
        saved += a * s.intermediate if "down_proj" in targets else 0
        return saved + a * rank * len(targets & {lin.name for lin in s.linears})
    if setup.method == "adapter":
        m = h // setup.option("reduction_factor", 16)
        count = 2 if setup.option("variant", "houlsby") == "houlsby" else 1
        return count * (a * h + 2 * a * m)  # down-proj input, its output, the non-linearity's output
    if setup.method == "prefix":
        extra_kv = setup.option("num_virtual_tokens", 20) * 2 * a * s.hidden // max(setup.seq_len, 1)
        return extra_kv + 2 * a * (s.hidden - s.kv_dim)  # with a mask, HF repeats K/V to all heads (GQA)
    return 0


def layer_bytes_per_token(s: ModelShape, setup: TrainingSetup) -> int:
    """Saved bytes per token of one decoder layer (without checkpointing) under `setup`."""
    r = regime(setup)
    if setup.method == "full":
        return full_layer(s, r)
    return frozen_layer(s, r) + peft_extra(s, setup, r)


@dataclass(frozen=True)
class ActivationBytes:
    """Activation figures of one micro-batch: what the forward leaves saved, and one layer's share."""

    saved: int  # all layers' saved tensors at the end of the forward (checkpointing: the layer inputs)
    one_layer: int  # one layer's saved tensors (recomputed at once under checkpointing)
    weight_cache: int  # autocast's bf16 weight copies held during the forward (amp, unsharded)


def model_seq_len(setup: TrainingSetup) -> int:
    """Positions the decoder layers run over: prompt tuning prepends its virtual tokens to every row (the logits
    of those positions are cut before the loss, so `logits_bytes` keeps `seq_len`)."""
    return setup.seq_len + (setup.option("num_virtual_tokens", 20) if setup.method == "prompt" else 0)


def activation_bytes(s: ModelShape, setup: TrainingSetup, trainable_layers: int) -> ActivationBytes:
    """Saved activations for `setup`; `trainable_layers` is L for full, N for freeze, 0 for PEFT methods."""
    r = regime(setup)
    tokens = setup.batch_size * model_seq_len(setup)
    if setup.method == "freeze":
        per_layer = [full_layer(s, r)] * trainable_layers  # layers below the first trainable one save nothing
    else:
        per_layer = [layer_bytes_per_token(s, setup)] * s.layers
    final_norm = (12 if setup.method == "full" else 4) * s.hidden + 4
    rotary = 2 * s.head_dim * r.a
    cache = 0
    if r.autocast_cache:
        linear = sum(lin.d_in * lin.d_out for lin in s.linears)
        cache = 2 * linear * (s.layers if setup.method == "full" else trainable_layers)
    if setup.gradient_checkpointing:
        saved = len(per_layer) * r.residual * s.hidden + final_norm + rotary
    else:
        saved = sum(per_layer) + final_norm + rotary
    one = max(per_layer, default=0)
    if setup.method == "prefix":
        saved += setup.seq_len + setup.option("num_virtual_tokens", 20)  # the bool mask (B, 1, S, S + P)
    return ActivationBytes(saved * tokens + cache, one * tokens, cache)


def logits_bytes(s: ModelShape, setup: TrainingSetup) -> tuple[int, int]:
    """(forward peak, backward peak) of the logits and the loss, beyond the saved activations.

    HF's loss upcasts the logits to fp32 and log_softmax saves its fp32 output: the forward holds the logits
    (a bytes), their fp32 copy and the log-probabilities (4 + 4) at once: (a + 8) V bytes per token, with no extra
    copy in fp32 (8 V). The backward starts with the saved log-probabilities, the loss gradient and the
    log_softmax gradient: 12 V bytes per token.
    """
    tokens = setup.batch_size * setup.seq_len
    copy = 0 if regime(setup).a == 4 else 2
    return (copy + 8) * s.vocab * tokens, 12 * s.vocab * tokens

"""Tiny mixture-of-experts models for the LoRA-on-experts tests: Qwen3-MoE and Mixtral, 2 layers, 4 experts of which
2 route each token, hidden 16, expert MLP 8 (Qwen3-MoE's router is `mlp.gate`, a TopKRouter with a [E, h] weight,
Mixtral's too), fp32, seeded, in eval mode."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, MixtralConfig, PretrainedConfig, Qwen3MoeConfig

MOE_ARCHS = ("qwen3_moe", "mixtral")
VOCAB = 64
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
ROUTER = "mlp.gate.weight"


def moe_config(arch: str) -> PretrainedConfig:
    """The config of a tiny `arch` MoE model (sizes in the module docstring)."""
    common = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.1)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**common, head_dim=4, intermediate_size=32, moe_intermediate_size=8, num_experts=4)
    if arch == "mixtral":
        return MixtralConfig(**common, intermediate_size=8, num_local_experts=4, sliding_window=None)
    raise ValueError(f"unknown tiny MoE architecture {arch!r}; choose one of {', '.join(MOE_ARCHS)}")


def moe_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A seeded tiny fp32 MoE CausalLM (same seed, same weights), in eval mode."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(moe_config(arch)).eval()


def moe_input(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    """Random token ids [batch, length] in [0, VOCAB)."""
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))

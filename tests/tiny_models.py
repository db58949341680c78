"""Tiny random models built from configs (no network), one per architecture family the tests cover.

Llama (GQA), Qwen2 (q/k/v biases), GPT-2 (Conv1D, fused c_attn), Mistral, Gemma (tied embeddings). Every model is
fp32, in eval mode, with dropout off, and seeded, so two calls give identical weights.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**_COMMON, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**_COMMON, tie_word_embeddings=False),
    "gemma": lambda: GemmaConfig(**_COMMON, head_dim=8, tie_word_embeddings=True),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}


def tiny_model(kind: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A seeded tiny fp32 CausalLM of the given family, in eval mode. Biases are randomised too (Qwen2 q/k/v)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind]())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model.eval()


def tiny_input(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    """Random token ids [batch, length]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def perturb_adapter(model: torch.nn.Module, seed: int = 2, scale: float = 0.1) -> None:
    """Give every trainable parameter random values, as training would (B = 0 would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=g) * scale)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits

"""Tiny random models (built from configs, no network) shared by the bottleneck / prefix / prompt tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

VOCAB = 96


def tiny_config(arch: str):
    """A 2-layer config: 4 heads of 16, 2 kv heads (GQA) where the architecture has them."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.1)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised tiny CausalLM in eval mode (same seed, same weights)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    model.generation_config.eos_token_id = None  # never stop early: the tests compare a fixed number of tokens
    return model


def token_batch(batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy_by_full_forward(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding the slow way: one full forward (no cache) per new token."""
    seq = ids
    for _ in range(steps):
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, ids.shape[1]:]


def greedy_generate(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """model.generate() greedy with the KV cache; the new tokens only."""
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                         do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def train_steps(model: torch.nn.Module, ids: torch.Tensor, steps: int = 8, lr: float = 1e-2) -> tuple[float, float]:
    """A few AdamW steps of next-token loss on one batch; (first loss, last loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses[0], losses[-1]


def left_padded_matches_rows(model: torch.nn.Module, steps: int = 5) -> bool:
    """A left-padded batch generates, row by row, what each prompt generates alone."""
    a, b = token_batch(1, 6, seed=2), token_batch(1, 4, seed=3)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    new = out[:, ids.shape[1]:]
    return torch.equal(new[0], greedy_generate(model, a, steps)[0]) and torch.equal(new[1], greedy_generate(model, b, steps)[0])

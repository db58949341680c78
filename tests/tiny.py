"""Tiny random models (built from configs, no network) and the helpers the tests use them with.

One config factory, `tiny_config(arch, size)`, for every architecture family the tests cover: Llama (GQA),
Qwen2 (q/k/v biases), GPT-2 (Conv1D, fused c_attn), Mistral, Gemma (tied embeddings). Every model has 2 layers,
4 heads and 2 kv heads (GQA where the architecture has it); the `Size` presets fix the rest, and several tests'
expected numbers depend on them, so a test keeps the preset it was written for:

- SMALL: vocab 128, hidden 32, intermediate 64, biases re-drawn from N(0, 0.1) (zero biases would hide bugs):
  the LoRA, PEFT-interop, load-error, merging, data and CLI tests.
- WIDE: vocab 96, hidden 64 (heads of 16), intermediate 96, initializer_range 0.1: the bottleneck / prefix /
  prompt tests (bottleneck reduction factors and prefix KV widths need hidden 64).
- QUANT: vocab 128, hidden 64, intermediate 128: the QLoRA tests that run a model loaded by plain transformers +
  bitsandbytes (PEFT's side): on an AVX512-BF16 CPU bitsandbytes' 4-bit eval kernel needs input widths that are
  multiples of 64 (peftkit turns that kernel off, `peftkit.io.quantize.keep_trainable_layout`).

`tiny_model` is seeded (same seed, same weights), fp32, in eval mode, dropout off, and never stops generating at
an EOS (tests compare a fixed number of new tokens). `save_tiny_checkpoint` saves a tiny Llama with the embedded
model's tokenizer for the trainer / eval tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

ARCHS = ("llama", "qwen2", "mistral", "gemma", "gpt2")


@dataclass(frozen=True)
class Size:
    """Dimensions and weight scales of a tiny model."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    positions: int = 128
    init_std: float = 0.02  # initializer_range (0.02 is transformers' default)
    bias_std: float | None = None  # re-draw every bias from N(0, bias_std) after init; None: keep the init's

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SMALL = Size(vocab=128, hidden=32, intermediate=64, bias_std=0.1)
WIDE = Size(vocab=96, hidden=64, intermediate=96, init_std=0.1)
QUANT = Size(vocab=128, hidden=64, intermediate=128, bias_std=0.1)  # see QUANT in the module docstring


def tiny_config(arch: str, size: Size = SMALL, **overrides) -> PretrainedConfig:
    """The config of a tiny `arch` model of `size`; `overrides` are passed to the config class as they are."""
    common = dict(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                  num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                  max_position_embeddings=size.positions, initializer_range=size.init_std)
    if arch == "llama":
        return LlamaConfig(**{**common, "tie_word_embeddings": False, **overrides})
    if arch == "qwen2":
        return Qwen2Config(**{**common, "tie_word_embeddings": False, **overrides})
    if arch == "mistral":
        return MistralConfig(**{**common, "tie_word_embeddings": False, "sliding_window": None, **overrides})
    if arch == "gemma":
        return GemmaConfig(**{**common, "head_dim": size.head_dim, "tie_word_embeddings": True, **overrides})
    if arch == "gpt2":
        return GPT2Config(**{"vocab_size": size.vocab, "n_embd": size.hidden, "n_layer": size.layers,
                             "n_head": size.heads, "n_positions": size.positions, "initializer_range": size.init_std,
                             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **overrides})
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def tiny_model(arch: str = "llama", size: Size = SMALL, seed: int = 0) -> torch.nn.Module:
    """A seeded tiny fp32 CausalLM of the given family and size, in eval mode (same seed, same weights)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, size))
    if size.bias_std is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, size.bias_std)
    model.generation_config.eos_token_id = None  # never stop early: the tests compare a fixed number of tokens
    return model.eval()


def _random_ids(size: Size, low: int, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(low, size.vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def tiny_input(batch: int = 2, length: int = 7, seed: int = 1, size: Size = SMALL) -> torch.Tensor:
    """Random token ids [batch, length] in [0, vocab)."""
    return _random_ids(size, 0, batch, length, seed)


def token_batch(batch: int = 2, length: int = 6, seed: int = 1, size: Size = WIDE) -> torch.Tensor:
    """Random token ids [batch, length] in [1, vocab): never 0, the pad id of `left_padded_matches_rows`."""
    return _random_ids(size, 1, batch, length, seed)


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


def greedy_by_full_forward(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding the slow way: one full forward (no cache) per new token."""
    seq = ids
    for _ in range(steps):
        out = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False).logits
        seq = torch.cat([seq, out[:, -1].argmax(-1, keepdim=True)], dim=1)
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


def left_padded_matches_rows(model: torch.nn.Module, steps: int = 5, size: Size = WIDE) -> bool:
    """A left-padded batch generates, row by row, what each prompt generates alone."""
    a, b = token_batch(1, 6, seed=2, size=size), token_batch(1, 4, seed=3, size=size)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    new = out[:, ids.shape[1]:]
    return (torch.equal(new[0], greedy_generate(model, a, steps)[0])
            and torch.equal(new[1], greedy_generate(model, b, steps)[0]))


# The trainer / eval tests: a tiny Llama saved with the embedded model's tokenizer (already converted and cached),
# so prompts render with the same chat template as a real run, and tiny alpaca data.

ANSWERS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]


def save_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Save a tiny Llama (hidden 32, 256 positions, tied embeddings, the tokenizer's vocab and special tokens) with
    the embedded model's tokenizer to `folder`; returns it."""
    from transformers import AutoTokenizer

    from peftkit.io.models import embedded_folder

    tokenizer = AutoTokenizer.from_pretrained(embedded_folder())
    size = Size(vocab=len(tokenizer), hidden=32, intermediate=64, positions=256)
    config = tiny_config("llama", size, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_rows(path: Path, n: int, offset: int = 0) -> Path:
    """`n` alpaca rows (a word-lookup task) as JSONL."""
    with path.open("w") as f:
        for i in range(offset, offset + n):
            word = ANSWERS[i % len(ANSWERS)]
            f.write(json.dumps({"instruction": f"Say word number {i % len(ANSWERS)}.", "input": "",
                                "output": word}) + "\n")
    return path

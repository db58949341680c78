"""Shared helpers for the trainer tests: a tiny Llama saved to a folder, and tiny alpaca data (no network).

The tiny model reuses the embedded model's tokenizer (already converted and cached), so prompts render with the
same chat template as the real run; its weights are random, 2 layers of width 32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ANSWERS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Save a 2-layer Llama (hidden 32, GQA 4/2 heads) with the embedded tokenizer to `folder`; returns it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peftkit.io.models import embedded_folder

    tokenizer = AutoTokenizer.from_pretrained(embedded_folder())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
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

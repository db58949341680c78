"""Prompt tuning: generate() keeps the soft prompt, logits line up with the caller's tokens, PEFT interop, training."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.core.counting import count_parameters
from peftkit.core.registry import get_method
from peftkit.errors import PeftkitError
from tests.tiny import (
    WIDE,
    greedy_by_full_forward,
    greedy_generate,
    left_padded_matches_rows,
    tiny_config,
    tiny_model,
    token_batch,
    train_steps,
)

P, D = 3, 64


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_generate_keeps_prompt(arch: str) -> None:
    ids = token_batch()
    base = greedy_generate(tiny_model(arch, WIDE), ids, 6)
    model = peftkit.inject(tiny_model(arch, WIDE), peftkit.PromptConfig(num_virtual_tokens=P))
    generated = greedy_generate(model, ids, 6)
    assert torch.equal(generated, greedy_by_full_forward(model, ids, 6))
    assert not torch.equal(generated, base)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_batch_generates_like_single_rows(arch: str) -> None:
    model = peftkit.inject(tiny_model(arch, WIDE), peftkit.PromptConfig(num_virtual_tokens=P))
    assert left_padded_matches_rows(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_counts_and_logit_alignment(arch: str) -> None:
    ids = token_batch()
    model = peftkit.inject(tiny_model(arch, WIDE), peftkit.PromptConfig(num_virtual_tokens=P))
    assert peftkit.trainable_parameters(model)[0] == P * D
    assert count_parameters(tiny_config(arch, WIDE), "prompt", num_virtual_tokens=P)[0] == P * D
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape[:2] == ids.shape  # the prompt's positions are cut off
    assert out.loss is not None and torch.isfinite(out.loss)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_interop_both_ways(arch: str, tmp_path) -> None:
    from peft import PeftModel, PromptTuningConfig, get_peft_model

    ids = token_batch()
    mask = torch.ones_like(ids)
    peft_model = get_peft_model(tiny_model(arch, WIDE), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    theirs = peft_model(input_ids=ids, attention_mask=mask, labels=ids)
    peft_model.save_pretrained(tmp_path / "peft")
    model = peftkit.load_adapter(tiny_model(arch, WIDE), tmp_path / "peft")
    ours = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert (ours.logits - theirs.logits[:, 4:]).abs().max() <= 1e-5  # PEFT returns the 4 prompt positions too
    assert abs(ours.loss.item() - theirs.loss.item()) <= 1e-5

    peftkit.save_adapter(model, tmp_path / "ours")
    again = PeftModel.from_pretrained(tiny_model(arch, WIDE), tmp_path / "ours").eval()
    assert (again(input_ids=ids, attention_mask=mask).logits[:, 4:] - ours.logits).abs().max() <= 1e-5


def test_training_lowers_loss() -> None:
    torch.manual_seed(0)
    model = peftkit.inject(tiny_model("llama", WIDE), peftkit.PromptConfig(num_virtual_tokens=4))
    first, last = train_steps(model, token_batch(4, 12), lr=5e-2)
    assert last < first - 0.1


def test_merge_refused_and_delete_restores_base() -> None:
    ids = token_batch()
    base = tiny_model("gpt2", WIDE)(input_ids=ids).logits
    model = peftkit.inject(tiny_model("gpt2", WIDE), peftkit.PromptConfig(num_virtual_tokens=P))
    with pytest.raises(PeftkitError, match="prepends learned input embeddings"):
        peftkit.merge(model)
    peftkit.delete_adapter(model, "default")
    assert torch.equal(model(input_ids=ids).logits, base)


def test_bad_inputs() -> None:
    with pytest.raises(PeftkitError, match="num_virtual_tokens must be >= 1 and <= 65,536, got 0"):
        get_method("prompt").build_config({"num_virtual_tokens": "0"})
    with pytest.raises(PeftkitError, match="sample_vocab, random"):
        peftkit.PromptConfig(init="text")
    with pytest.raises(PeftkitError, match="has no option 'rank'"):
        get_method("prompt").build_config({"rank": 8})


def test_logits_to_keep_is_not_cut() -> None:
    """A trainer asking for some logits (negative indices) gets exactly those, not a prompt-shifted slice."""
    ids = token_batch(2, 8)
    model = peftkit.inject(tiny_model("llama", WIDE), peftkit.PromptConfig(num_virtual_tokens=P))
    full = model(input_ids=ids, use_cache=False).logits
    keep = torch.tensor([-7, -5, -4, -2])
    kept = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
    assert torch.allclose(kept, full[:, keep], atol=1e-6)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_packed_rows_refused(method: str) -> None:
    config = peftkit.PrefixConfig(num_virtual_tokens=P) if method == "prefix" else peftkit.PromptConfig(num_virtual_tokens=P)
    model = peftkit.inject(tiny_model("llama", WIDE), config)
    packed = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with pytest.raises(PeftkitError, match="packed sequences"):
        model(input_ids=token_batch(1, 6), position_ids=packed, use_cache=False)

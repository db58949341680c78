"""Prefix tuning: generate() keeps the prefix, GQA layout and counts, PEFT interop both ways, training, refusals."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import peftkit
from peftkit.core.counting import count_parameters
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

P, LAYERS = 3, 2
KV_WIDTH = {"llama": 2 * 16, "qwen2": 2 * 16, "mistral": 2 * 16, "gpt2": 4 * 16}  # kv_heads x head_dim


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_generate_keeps_prefix(arch: str) -> None:
    """Greedy generate() (KV cache) == argmax of full forwards with the prefix, and != the base model."""
    ids = token_batch()
    base = greedy_generate(tiny_model(arch, WIDE), ids, 6)
    model = peftkit.inject(tiny_model(arch, WIDE), peftkit.PrefixConfig(num_virtual_tokens=P))
    generated = greedy_generate(model, ids, 6)
    assert torch.equal(generated, greedy_by_full_forward(model, ids, 6))
    assert not torch.equal(generated, base)
    with peftkit.disable_adapters(model):
        assert torch.equal(greedy_generate(model, ids, 6), base)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_batch_generates_like_single_rows(arch: str) -> None:
    model = peftkit.inject(tiny_model(arch, WIDE), peftkit.PrefixConfig(num_virtual_tokens=P))
    assert left_padded_matches_rows(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_counts_and_gqa_layout(arch: str) -> None:
    model = peftkit.inject(tiny_model(arch, WIDE), peftkit.PrefixConfig(num_virtual_tokens=P))
    expected = P * LAYERS * 2 * KV_WIDTH[arch]
    assert peftkit.trainable_parameters(model)[0] == expected
    assert count_parameters(tiny_config(arch, WIDE), "prefix", num_virtual_tokens=P)[0] == expected
    _, tensors = peftkit.core.registry.get_method("prefix").export(model, "default")
    assert tuple(tensors["prompt_embeddings"].shape) == (P, LAYERS * 2 * KV_WIDTH[arch])


def test_projection_count_and_folding(tmp_path) -> None:
    """The MLP is trained (model parameters); the saved adapter is its flat output."""
    config = peftkit.PrefixConfig(num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=10)
    model = peftkit.inject(tiny_model("llama", WIDE), config)
    d, width = KV_WIDTH["llama"], LAYERS * 2 * KV_WIDTH["llama"]
    assert peftkit.trainable_parameters(model)[0] == P * d + (d * 10 + 10) + (10 * width + width)
    ids = token_batch()
    want = model(input_ids=ids).logits
    peftkit.save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["prefix_projection"] is False and saved["token_dim"] == d and saved["num_attention_heads"] == 2
    loaded = peftkit.load_adapter(tiny_model("llama", WIDE), tmp_path / "a")
    assert peftkit.trainable_parameters(loaded)[0] == P * width
    assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_loads_ours(arch: str, tmp_path) -> None:
    from peft import PeftModel

    ids = token_batch()
    mask = torch.ones_like(ids)
    model = peftkit.inject(tiny_model(arch, WIDE), peftkit.PrefixConfig(num_virtual_tokens=P, prefix_projection=True))
    ours = model(input_ids=ids, attention_mask=mask).logits
    peftkit.save_adapter(model, tmp_path / "a")
    theirs = PeftModel.from_pretrained(tiny_model(arch, WIDE), tmp_path / "a").eval()
    assert (theirs(input_ids=ids, attention_mask=mask).logits - ours).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_we_load_peft_saved(arch: str, tmp_path) -> None:
    from peft import PrefixTuningConfig, get_peft_model

    ids = token_batch()
    mask = torch.ones_like(ids)
    peft_model = get_peft_model(tiny_model(arch, WIDE), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    peft_model.save_pretrained(tmp_path / "a")
    model = peftkit.load_adapter(tiny_model(arch, WIDE), tmp_path / "a")
    assert (model(input_ids=ids, attention_mask=mask).logits - theirs).abs().max() <= 1e-5


def test_explicit_positions_match_implicit() -> None:
    """Caller-side positions count real tokens from 0; the hook moves them behind the prefix."""
    ids = token_batch()
    model = peftkit.inject(tiny_model("llama", WIDE), peftkit.PrefixConfig(num_virtual_tokens=P))
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    assert torch.allclose(model(input_ids=ids, position_ids=positions).logits, model(input_ids=ids).logits)


def test_training_lowers_loss_with_projection() -> None:
    torch.manual_seed(0)
    config = peftkit.PrefixConfig(num_virtual_tokens=4, prefix_projection=True, init="zero")
    model = peftkit.inject(tiny_model("qwen2", WIDE), config)
    first, last = train_steps(model, token_batch(4, 12))
    assert last < first - 0.1


def test_delete_removes_hooks_and_merge_is_refused() -> None:
    ids = token_batch()
    base = tiny_model("llama", WIDE)(input_ids=ids).logits
    model = peftkit.inject(tiny_model("llama", WIDE), peftkit.PrefixConfig(num_virtual_tokens=P))
    with pytest.raises(PeftkitError, match="key/value vectors"):
        peftkit.merge(model)
    peftkit.delete_adapter(model, "default")
    assert not hasattr(model, "peftkit_prefix")
    assert not model._forward_pre_hooks
    assert torch.equal(model(input_ids=ids).logits, base)


@pytest.mark.parametrize("bad", [0, -3, "five", True])
def test_bad_num_virtual_tokens(bad) -> None:
    with pytest.raises(PeftkitError, match="^num_virtual_tokens must be (>= 1 and <= 65,536|a whole number), got"):
        peftkit.PrefixConfig(num_virtual_tokens=bad)


def test_bad_init_and_foreign_adapter(tmp_path) -> None:
    with pytest.raises(PeftkitError, match="random, zero"):
        peftkit.PrefixConfig(init="ones")
    model = peftkit.inject(tiny_model("llama", WIDE), peftkit.PrefixConfig(num_virtual_tokens=P))
    peftkit.save_adapter(model, tmp_path / "a")
    with warnings.catch_warnings(), pytest.raises(PeftkitError, match="token_dim=32 but this model needs 64"):
        peftkit.load_adapter(tiny_model("gpt2", WIDE), tmp_path / "a")


def test_gradient_checkpointing_refused_in_training() -> None:
    """transformers drops the cache under checkpointing; training would silently ignore the prefix."""
    model = peftkit.inject(tiny_model("llama", WIDE), peftkit.PrefixConfig(num_virtual_tokens=P))
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(PeftkitError, match="gradient checkpointing"):
        model(input_ids=token_batch(), labels=token_batch())
    model.eval()
    assert model(input_ids=token_batch()).logits.shape[1] == token_batch().shape[1]  # inference is unaffected


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_vocab_init_equals_real_tokens_in_front(arch: str, monkeypatch) -> None:
    """Li & Liang's real-word init: the prefix starts as the K/V of P real tokens, so the prefixed model equals the
    base model run on [those tokens ; input] (checks the [L0.K, L0.V, ...] layout and positions from P)."""
    front = torch.tensor([[5, 17, 42]])
    monkeypatch.setattr(torch, "randint", lambda *args, **kwargs: front)
    model = peftkit.inject(tiny_model(arch, WIDE), peftkit.PrefixConfig(num_virtual_tokens=P))
    monkeypatch.undo()
    ids = token_batch()
    with peftkit.disable_adapters(model):
        want = model(input_ids=torch.cat([front.expand(ids.shape[0], -1), ids], 1)).logits[:, P:]
    assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)

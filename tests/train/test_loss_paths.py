"""The fused linear + cross-entropy (train/loop/linear_ce.py) and the three loss paths of train/loop/loss.py.

The fused path must be a pure speed / memory change: the same loss and the same gradients as the plain
cross-entropy over materialised logits, for every architecture family, with masked positions and rows, across
chunk boundaries, and under gradient accumulation (tests/train/test_loop.py runs the loop on the fused path).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Gemma2Config

import peftkit
from peftkit.train.loop.linear_ce import linear_cross_entropy
from peftkit.train.loop.loss import loss_path, micro_loss
from tests.tiny import ARCHS, SMALL, tiny_model


def _inputs(n=11, h=16, v=37, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, requires_grad=True)
    b = torch.randn(v, generator=gen, requires_grad=True) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, b, targets


@pytest.mark.parametrize("chunk_rows", [1, 4, 11, None])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_cross_entropy_equals_the_plain_loss_and_gradients(chunk_rows, bias):
    hidden, weight, b, targets = _inputs(bias=bias)
    fused = linear_cross_entropy(hidden, weight, b, targets, chunk_rows)
    (fused * 0.37).backward()  # a scale, as the loop's 1 / targets_in_step
    got = [t.grad.clone() for t in (hidden, weight, b) if t is not None]
    for t in (hidden, weight, b):
        if t is not None:
            t.grad = None
    plain = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum")
    (plain * 0.37).backward()
    want = [t.grad for t in (hidden, weight, b) if t is not None]
    assert fused.dtype == torch.float32 and torch.allclose(fused, plain, rtol=1e-6, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_computes_only_the_gradients_asked_for():
    hidden, weight, b, targets = _inputs()
    weight.requires_grad_(False)
    b.requires_grad_(False)
    linear_cross_entropy(hidden, weight, b, targets, 3).backward()
    assert hidden.grad is not None and weight.grad is None and b.grad is None
    with torch.no_grad():  # evaluation: a value, no graph
        value = linear_cross_entropy(hidden, weight, b, targets)
    assert not value.requires_grad
    assert torch.allclose(value, F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum"))


def test_evaluating_a_trainable_head_computes_no_gradient(monkeypatch):
    """Under no_grad, needs_input_grad still follows requires_grad: the function must not compute (and throw away)
    the head's vocab x hidden gradient while evaluating a whole-model fine-tune."""
    hidden, weight, b, targets = _inputs()
    made = []
    real_zeros = torch.zeros

    def spying_zeros(*args, **kwargs):
        made.append(args)
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", spying_zeros)
    with torch.no_grad():
        linear_cross_entropy(hidden, weight, b, targets, 3)
    assert not [a for a in made if a and tuple(a[0]) == tuple(weight.shape)], "a weight-gradient buffer was made"


def _batch(vocab, seed=3):
    """Three rows of different lengths: padding, prompt tokens masked, and one row with no target at all."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.clone()
    labels[:, :4] = -100           # prompts
    labels[1, 6:] = -100           # padding
    labels[2] = -100               # a row that scores nothing
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch, path):
    model.zero_grad(set_to_none=True)
    loss = micro_loss(model, batch, path)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("trainable", ["lora", "whole"])
def test_fused_path_equals_the_plain_paths(arch, trainable):
    model = tiny_model(arch)
    if trainable == "lora":
        torch.manual_seed(0)
        peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules="all-linear"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    else:  # the LM head trains too (tied to the embeddings in Gemma)
        for p in model.parameters():
            p.requires_grad_(True)
    assert loss_path(model) == "fused"  # all-linear leaves the LM head alone (PEFT's meaning)
    batch = _batch(SMALL.vocab)
    full, full_grads = _loss_and_grads(model, batch, "full")
    for path in ("keep", "fused"):
        loss, grads = _loss_and_grads(model, batch, path)
        assert torch.allclose(loss, full, rtol=1e-6, atol=1e-5), path
        assert grads.keys() == full_grads.keys()
        for name, g in grads.items():
            assert torch.allclose(g, full_grads[name], rtol=1e-4, atol=1e-6), (path, name)


def test_fused_path_under_bf16_autocast_matches_within_bf16_tolerance():
    model = tiny_model("llama")
    batch = _batch(SMALL.vocab)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keep = micro_loss(model, batch, "keep")
        fused = micro_loss(model, batch, "fused")
    assert torch.allclose(fused, keep, rtol=2e-2)


def test_models_that_post_process_logits_do_not_take_the_fused_path():
    config = Gemma2Config(vocab_size=SMALL.vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=30.0)
    model = AutoModelForCausalLM.from_config(config)
    assert loss_path(model) == "keep"
    batch = _batch(SMALL.vocab)
    assert torch.allclose(micro_loss(model, batch, "fused"), micro_loss(model, batch, "full"), atol=1e-5)
    config.final_logit_softcapping = None
    assert loss_path(AutoModelForCausalLM.from_config(config)) == "fused"


def test_an_adapter_on_the_lm_head_takes_the_logits_path():
    model = tiny_model("llama")
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert loss_path(model) == "keep"


def test_a_sharded_head_weight_takes_the_logits_path():
    """FSDP2 keeps a DTensor, DeepSpeed ZeRO-3 a partition (ds_id) outside the forward: not whole, so no fusing."""
    model = tiny_model("llama")
    model.lm_head.weight.ds_id = 7  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    assert loss_path(model) == "keep"

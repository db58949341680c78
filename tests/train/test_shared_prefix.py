"""The shared-prefix forward (train/loop/shared_prefix.py) is a pure speed change: per architecture, the same loss and
gradients as the plain forward (fp32), on every loss path, with padded rows, for LoRA and a full fine-tune; the
prefix length is the longest common one cut before the first target; and the cases it must refuse say why."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen3Config

import peftkit
from peftkit.core.labels import IGNORE_INDEX
from peftkit.data import collate
from peftkit.train.config import load_train_config, resolve_defaults
from peftkit.train.devices.speed import apply_speed_settings, compile_layers, should_share_prefix
from peftkit.train.loop.loss import micro_loss
from peftkit.train.loop.shared_prefix import ARCHITECTURES, KEY, MIN_SHARED, shared_length, sharing_blocker
from peftkit.train.run import train
from peftkit.train.splits import Split, collate_fn
from tests.tiny import ARCHS, save_tiny_checkpoint, tiny_model, write_rows


def _rows(seed: int = 0, prefix: int = 20) -> tuple[list[list[int]], list[list[int]]]:
    """Three rows of different lengths that share `prefix` tokens; targets start a few tokens after it."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(1, 128, (prefix,), generator=gen).tolist()
    ids, labels = [], []
    for rest, prompt in ((9, 3), (5, 2), (12, 4)):
        tail = torch.randint(1, 128, (rest,), generator=gen).tolist()
        row = shared + tail
        ids.append(row)
        labels.append([IGNORE_INDEX] * (prefix + prompt) + row[prefix + prompt:])
    return ids, labels


def _batch(ids, labels, prefix=None):
    batch = {k: v for k, v in collate([{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels, strict=True)],
                                      0, False).items() if k != "num_targets"}
    if prefix:
        batch[KEY] = prefix
    return batch


def _loss_and_grads(model, batch, path):
    model.zero_grad()
    loss = micro_loss(model, batch, path)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _model(arch: str) -> torch.nn.Module:
    if arch != "qwen3":
        return tiny_model(arch).train()
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(config).train()


@pytest.mark.parametrize("arch", [*ARCHS, "qwen3"])
@pytest.mark.parametrize("path", ["fused", "keep"])
def test_shared_prefix_matches_the_plain_forward(arch, path):
    assert arch in ARCHITECTURES
    model = _model(arch)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():  # non-zero B, so every LoRA weight shapes the loss
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    ids, labels = _rows()
    prefix = shared_length(ids, labels)
    assert prefix == 20  # the 20 shared tokens (the first target, label 22, is predicted later, at column 21)
    plain_loss, plain = _loss_and_grads(model, _batch(ids, labels), path)
    shared_loss, shared = _loss_and_grads(model, _batch(ids, labels, prefix), path)
    assert plain and plain.keys() == shared.keys()
    torch.testing.assert_close(shared_loss, plain_loss, rtol=1e-5, atol=1e-5)
    for name, grad in plain.items():
        torch.testing.assert_close(shared[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_shared_prefix_matches_for_a_full_fine_tune_and_under_no_grad():
    model = tiny_model("qwen2").train()
    ids, labels = _rows(seed=3)
    prefix = shared_length(ids, labels)
    plain_loss, plain = _loss_and_grads(model, _batch(ids, labels), "fused")
    shared_loss, shared = _loss_and_grads(model, _batch(ids, labels, prefix), "fused")
    torch.testing.assert_close(shared_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert len(plain) == len(list(model.parameters()))  # every weight, embeddings included, got a gradient
    for name, grad in plain.items():
        torch.testing.assert_close(shared[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation
        torch.testing.assert_close(micro_loss(model, _batch(ids, labels, prefix)), plain_loss, rtol=1e-5, atol=1e-5)


def test_shared_length_is_the_common_prefix_cut_before_the_first_target():
    ids, labels = _rows(prefix=30)
    assert shared_length(ids, labels) == 30
    ids[1][25] = (ids[1][25] % 127) + 1  # row 1 differs at column 25
    assert shared_length(ids, labels) == 25
    labels[2][20] = ids[2][20]  # row 2 trains on column 20: predicted at column 19
    assert shared_length(ids, labels) == 19
    assert shared_length(ids[:1], labels[:1]) == 0  # one row shares with nobody
    short = [row[:MIN_SHARED - 1] + [5] for row in ids]
    assert shared_length(short, [[IGNORE_INDEX] * (len(r) - 1) + [5] for r in short]) == 0  # not worth it
    same = [ids[0], list(ids[0])]  # identical rows keep one column after the prefix
    assert shared_length(same, [[IGNORE_INDEX] * len(ids[0])] * 2) == len(ids[0]) - 1


def test_collate_marks_the_shared_prefix_only_when_asked():
    ids, labels = _rows()
    split = Split(ids, labels, [len(r) for r in ids], [])
    assert collate_fn(split, 0, False, "cpu", share_prefix=True)([0, 1, 2])[KEY] == 20
    assert KEY not in collate_fn(split, 0, False, "cpu")([0, 1, 2])
    assert KEY not in collate_fn(split, 0, False, "cpu", share_prefix=True)([1])


def test_sharing_blocker_names_each_reason():
    model = tiny_model("llama")
    assert sharing_blocker(model, packing=False, checkpointing=False, sharded=False) is None
    assert "packed" in sharing_blocker(model, packing=True, checkpointing=False, sharded=False)
    assert "checkpointing" in sharing_blocker(model, packing=False, checkpointing=True, sharded=False)
    assert "FSDP" in sharing_blocker(model, packing=False, checkpointing=False, sharded=True)
    peftkit.inject(model, peftkit.PrefixConfig(num_virtual_tokens=4))
    assert "prefix / prompt" in sharing_blocker(model, packing=False, checkpointing=False, sharded=False)
    model.config.model_type = "falcon"
    assert "not checked for falcon" in sharing_blocker(model, packing=False, checkpointing=False, sharded=False)


def test_a_run_with_shared_prefixes_trains_the_same_adapter(tmp_path, caplog):
    """End to end (chat-templated rows share the system prompt and "Say word number "): the same adapter."""
    model = save_tiny_checkpoint(tmp_path / "tiny")
    write_rows(tmp_path / "train.jsonl", 16)
    common = dict(model=str(model), data=str(tmp_path / "train.jsonl"), eval_split="4", max_steps=3, batch_size=4,
                  max_length=64, lr=1e-2, rank=4, dropout=0.0, precision="fp32", seed=3)
    adapters = {}
    for share in (True, False):
        with caplog.at_level(logging.INFO, logger="peftkit"):
            run = train(load_train_config(None, {**common, "share_prefix": share, "output": str(tmp_path / str(share))}),
                        progress=False)
        adapters[share] = load_file(str(run.saved / "adapter_model.safetensors"))
    assert "shared prompt prefixes: computed once per micro-batch" in caplog.text
    assert "shared prompt prefixes: off (--no-share-prefix)" in caplog.text
    assert max(float(t.abs().max()) for k, t in adapters[True].items() if "lora_B" in k) > 1e-3
    assert max(float((adapters[True][k] - adapters[False][k]).abs().max()) for k in adapters[False]) <= 1e-5


def test_shared_prefix_through_compiled_decoder_layers(tmp_path, monkeypatch):
    """Compiled layers (dynamo's "eager" backend: capture, not kernels) take the cache the prefix filled."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    ids, labels = _rows(seed=5)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = _model("llama")
        peftkit.inject(model, peftkit.LoraConfig(r=2))
        if compiled:
            compile_layers(model, backend="eager")
        results.append(_loss_and_grads(model, _batch(ids, labels, shared_length(ids, labels)), "fused"))
    (plain_loss, plain), (comp_loss, comp) = results
    torch.testing.assert_close(comp_loss, plain_loss, rtol=1e-5, atol=1e-5)
    for name, grad in plain.items():
        torch.testing.assert_close(comp[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiling_and_sharing_exclude_each_other(caplog):
    """Compiled layers recompile for each layer's cache: auto compile yields to sharing, --compile turns it off."""
    said = []
    for compile_flag in (None, True):
        model = tiny_model("llama")
        cfg = resolve_defaults(load_train_config(None, {"compile": compile_flag}))
        share = apply_speed_settings(model, cfg, "fp32", "cpu", 10**9, said.append)
        assert share is (compile_flag is None)
    assert "not compiled (shared prompt prefixes" in said[0] and "computed once" in said[1]
    assert " compiled (" in said[2] and "off (--compile" in said[3]


def test_rows_longer_than_a_sliding_window_do_not_share():
    model = tiny_model("mistral")
    model.config.sliding_window = 64
    cfg = resolve_defaults(load_train_config(None, {"max_length": 128}))
    share, why = should_share_prefix(model, cfg)
    assert not share and "sliding window of 64" in why
    assert should_share_prefix(model, resolve_defaults(load_train_config(None, {"max_length": 64})))[0]

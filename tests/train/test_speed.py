"""Speed settings: what `--precision auto` picks (the hardware probe mocked both ways), the attention choice,
when compiling is worth it, compiled decoder layers computing what the plain ones do, and the token budget's
validation."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.errors import PeftkitError
from peftkit.train.config import load_train_config, resolve_defaults
from peftkit.train.devices import precision as precision_module
from peftkit.train.devices.speed import (
    COMPILE_MIN_TOKENS,
    EAGER_MAX_LENGTH,
    choose_attention,
    compile_layers,
    set_attention,
    should_compile,
)
from peftkit.train.loop.loss import micro_loss
from tests.tiny import SMALL, tiny_model


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(("amx", "avx512", "want"), [(True, False, "AMX-BF16"), (False, True, "AVX512-BF16"),
                                                     (False, False, None)])
def test_auto_precision_follows_the_cpus_bf16_instructions(monkeypatch, no_gpu, amx, avx512, want):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512, raising=False)
    picked, why = precision_module.auto_precision()
    if want:
        assert picked == "amp" and want in why
    else:
        assert picked == "fp32" and "neither" in why
    acc, dtype, resolved = precision_module.make_accelerator("auto")
    assert resolved == picked and dtype == (torch.bfloat16 if want else torch.float32)
    assert acc.mixed_precision == ("bf16" if want else "no")


def test_cpu_flags_are_read_from_proc_cpuinfo_where_torch_has_no_probe(monkeypatch, no_gpu):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(precision_module, "_proc_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert precision_module.cpu_bf16_feature() == "AVX512-BF16"
    monkeypatch.setattr(precision_module, "_proc_cpu_flags", lambda: {"avx2", "fma"})
    assert precision_module.auto_precision()[0] == "fp32"


def test_auto_precision_on_a_gpu_depends_on_its_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    for supported, want in ((True, "amp"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert precision_module.auto_precision()[0] == want


def test_attention_choice():
    assert choose_attention("auto", "cpu", "amp", EAGER_MAX_LENGTH)[0] == "eager"
    assert choose_attention("auto", "cpu", "amp", EAGER_MAX_LENGTH + 1)[0] is None
    assert choose_attention("auto", "cpu", "fp32", 128)[0] is None
    assert choose_attention("auto", "cuda", "amp", 128)[0] is None
    assert choose_attention("sdpa", "cpu", "amp", 128)[0] == "sdpa"
    model = tiny_model("llama")
    assert set_attention(model, "eager") == "eager" and set_attention(model, None) == "eager"
    with pytest.raises(PeftkitError, match="attention"):
        load_train_config(None, {"attention": "flash"})


def test_compiling_is_automatic_only_for_long_runs():
    assert should_compile(None, COMPILE_MIN_TOKENS)[0] is True
    assert should_compile(None, COMPILE_MIN_TOKENS - 1)[0] is False
    assert should_compile(True, 10)[0] is True and should_compile(False, 10**9)[0] is False


def test_compiled_decoder_layers_give_the_same_loss_and_gradients(tmp_path, monkeypatch):
    """The wiring (each decoder layer compiled in place, LoRA inside, dynamic shapes) with dynamo's "eager"
    backend: traced graphs run as plain PyTorch, so this checks capture, not inductor's kernels."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = tiny_model("llama")
        torch.manual_seed(0)
        peftkit.inject(model, peftkit.LoraConfig(r=2))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        if compiled:
            assert compile_layers(model, backend="eager") == 2
        model.train()
        for length in (7, 9):  # a second length: dynamic shapes, no error
            ids = torch.randint(3, SMALL.vocab, (2, length), generator=torch.Generator().manual_seed(length))
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            loss = micro_loss(model, batch)
            loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (plain, plain_grads), (comp, comp_grads) = results
    assert torch.allclose(plain, comp, atol=1e-5)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, comp_grads[name], atol=1e-5), name


def test_batch_tokens_must_hold_the_longest_row():
    with pytest.raises(PeftkitError, match="batch_tokens .* at least max_length"):
        resolve_defaults(load_train_config(None, {"batch_tokens": 100, "max_length": 128}))
    assert resolve_defaults(load_train_config(None, {"batch_tokens": 1024})).batch_tokens == 1024


def test_batch_tokens_must_hold_a_whole_preference_pair():
    with pytest.raises(PeftkitError, match="2 x max_length"):
        resolve_defaults(load_train_config(None, {"batch_tokens": 200, "max_length": 128, "objective": "dpo"}))
    assert resolve_defaults(load_train_config(None, {"batch_tokens": 256, "max_length": 128,
                                                     "objective": "dpo"})).batch_tokens == 256


def test_the_memory_report_counts_the_token_budget():
    from peftkit.train.reporting.memory_report import _rows

    cfg = resolve_defaults(load_train_config(None, {"batch_tokens": 8192, "max_length": 512, "data": "x.jsonl"}))
    assert _rows(cfg) == 16  # 8192 padded positions = 16 rows of 512, not batch_size 4
    assert _rows(resolve_defaults(load_train_config(None, {"data": "x.jsonl"}))) == 4

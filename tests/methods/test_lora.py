"""LoRA behaviour: identity at init, merge == unmerged, switching / disabling, PiSSA, rsLoRA, patterns; invalid
configs get one clear PeftkitError."""

import pytest
import torch

import peftkit
from peftkit import LoraConfig, PeftkitError
from peftkit.methods.lora.layer import LoraLayer
from tests.tiny import logits, perturb_adapter, tiny_input, tiny_model

KINDS = ["llama", "qwen2", "gpt2", "mistral", "gemma"]


@pytest.mark.parametrize("kind", KINDS)
def test_injected_model_equals_base_at_init(kind):
    model, ids = tiny_model(kind), tiny_input()
    base = logits(model, ids)
    peftkit.inject(model, LoraConfig(r=4, target_modules="all-linear"))
    assert torch.equal(logits(model, ids), base)
    trainable, _ = peftkit.trainable_parameters(model)
    assert trainable > 0
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_unmerged_and_unmerge_restores(kind):
    model, ids = tiny_model(kind), tiny_input()
    base = logits(model, ids)
    peftkit.inject(model, LoraConfig(r=4, target_modules="all-linear"))
    perturb_adapter(model)
    with_lora = logits(model, ids)
    assert (with_lora - base).abs().max() > 1e-3  # the adapter really changes the output
    peftkit.merge_adapter(model)
    assert (logits(model, ids) - with_lora).abs().max() <= 1e-5
    peftkit.unmerge_adapter(model)
    assert (logits(model, ids) - with_lora).abs().max() <= 1e-5
    peftkit.merge(model)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert (logits(model, ids) - with_lora).abs().max() <= 1e-5


def test_merge_rounds_once_in_bf16():
    model = tiny_model("llama")
    peftkit.inject(model, LoraConfig(r=4))
    perturb_adapter(model)
    model.to(torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    w, a, b = (t.detach().float() for t in (layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    expected = (w + layer.scaling["default"] * (b @ a)).to(torch.bfloat16)  # fp32 sum, one rounding
    peftkit.merge(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, expected)


def test_several_adapters_switch_and_disable():
    model, ids = tiny_model("llama"), tiny_input()
    base = logits(model, ids)
    peftkit.inject(model, LoraConfig(r=4), name="a")
    perturb_adapter(model, seed=3)
    out_a = logits(model, ids)
    peftkit.inject(model, LoraConfig(r=2, target_modules=["k_proj", "o_proj"]), name="b")
    perturb_adapter(model, seed=4)
    out_b = logits(model, ids)
    assert (out_a - out_b).abs().max() > 1e-3
    trainable_b = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_b and all(".b." in n for n in trainable_b)
    peftkit.set_adapter(model, "a")
    assert torch.equal(logits(model, ids), out_a)
    assert all(".a." in n for n, p in model.named_parameters() if p.requires_grad)
    with peftkit.disable_adapters(model):
        assert torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model, ids), out_a)
    peftkit.delete_adapter(model, "a")
    assert torch.equal(logits(model, ids), out_b)


def test_disable_while_merged_restores_merge():
    model, ids = tiny_model("qwen2"), tiny_input()
    base = logits(model, ids)
    peftkit.inject(model, LoraConfig(r=4))
    perturb_adapter(model)
    out = logits(model, ids)
    peftkit.merge_adapter(model)
    with peftkit.disable_adapters(model):
        assert (logits(model, ids) - base).abs().max() <= 1e-5
    assert (logits(model, ids) - out).abs().max() <= 1e-5


def test_pissa_init_keeps_output_and_exports_plain_lora(tmp_path):
    model, ids = tiny_model("llama"), tiny_input()
    base = logits(model, ids)
    peftkit.inject(model, LoraConfig(r=4, init="pissa", target_modules="all-linear"))
    assert (logits(model, ids) - base).abs().max() <= 1e-4  # W_res + s B A == W
    with torch.no_grad():  # "train": nudge every factor
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    tuned = logits(model, ids)
    peftkit.save_adapter(model, tmp_path / "pissa")
    fresh = tiny_model("llama")  # the ORIGINAL weights, not the residual
    peftkit.load_adapter(fresh, tmp_path / "pissa")
    assert (logits(fresh, ids) - tuned).abs().max() <= 1e-4
    saved = peftkit.io.adapters.read_adapter(tmp_path / "pissa")[0]
    assert saved["r"] == 8 and saved["lora_alpha"] == 16


def test_rslora_scale_and_rank_pattern():
    model = tiny_model("llama")
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 1})
    peftkit.inject(model, cfg)
    q = model.model.layers[0].self_attn.q_proj
    v = model.model.layers[0].self_attn.v_proj
    assert q.scaling["default"] == pytest.approx(8 / 2.0)
    assert v.lora_A["default"].weight.shape[0] == 2 and v.scaling["default"] == pytest.approx(1 / 2**0.5)


def test_layers_to_transform_and_regex_targets():
    model = tiny_model("llama")
    peftkit.inject(model, LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1]))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert wrapped == ["model.layers.1.self_attn.q_proj"]
    model = tiny_model("llama")
    peftkit.inject(model, LoraConfig(r=2, target_modules=r".*\.mlp\.(up|down)_proj"))
    wrapped = sorted(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer))
    assert wrapped == ["down_proj", "down_proj", "up_proj", "up_proj"]


def test_all_linear_skips_lm_head_and_second_adapter_does_not_wrap_first():
    model = tiny_model("llama")
    peftkit.inject(model, LoraConfig(r=2, target_modules="all-linear"), name="a")
    peftkit.inject(model, LoraConfig(r=2, target_modules="all-linear"), name="b")
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(wrapped) == 2 * 7 and not any("lm_head" in n or "lora_" in n for n in wrapped)
    layer = model.model.layers[0].mlp.up_proj
    assert sorted(layer.adapter_names()) == ["a", "b"]


def test_training_step_changes_only_the_adapter():
    model, ids = tiny_model("gpt2"), tiny_input()
    peftkit.inject(model, LoraConfig(r=4))
    before = {n: p.clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_saved_files_follow_the_umask(tmp_path):
    """safetensors creates files 0600; saved adapters must be readable as the umask allows (a vLLM/TGI server
    often runs as another user)."""
    import os

    model = tiny_model("llama")
    peftkit.inject(model, LoraConfig(r=2))
    previous = os.umask(0o022)
    try:
        peftkit.save_adapter(model, tmp_path / "a")
    finally:
        os.umask(previous)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "kwargs,pattern",
    [({"r": 0}, "^rank must be >= 1 and <= 65,536, got 0$"), ({"r": -2}, "rank must be >= 1"),
     ({"r": 70000}, "^rank must be >= 1 and <= 65,536, got 70000$"), ({"r": 2.5}, "rank must be a whole number"),
     ({"lora_alpha": 0}, "alpha must be > 0"), ({"lora_dropout": 1.0}, r"dropout must be >= 0 and < 1"),
     ({"lora_dropout": -0.1}, "dropout"), ({"init": "svd"}, "choose one of default, gaussian, pissa")],
)
def test_invalid_lora_config(kwargs, pattern):
    with pytest.raises(PeftkitError, match=pattern):
        LoraConfig(**kwargs)

"""OLoRA (`--init olora`): PEFT's QR init, the base keeps the residual, and the saved adapter is a plain rank-2r LoRA
that HF PEFT loads on the ORIGINAL base with the trained model's logits (PEFT's weight conversion)."""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import peftkit
from peftkit.methods.lora import LoraConfig
from tests.tiny import logits, perturb_adapter, tiny_input, tiny_model


def test_olora_factors_and_residual_match_peft():
    ours, theirs = tiny_model("llama"), tiny_model("llama")
    peftkit.inject(ours, LoraConfig(r=4, lora_alpha=8, init="olora", target_modules=["q_proj", "down_proj"]))
    theirs = get_peft_model(theirs, PeftLoraConfig(r=4, lora_alpha=8, init_lora_weights="olora",
                                                   target_modules=["q_proj", "down_proj"]))
    for leaf in ("self_attn.q_proj", "mlp.down_proj"):
        mine = ours.get_submodule(f"model.layers.1.{leaf}")
        peft_layer = theirs.base_model.model.get_submodule(f"model.layers.1.{leaf}")
        for part in ("lora_A", "lora_B"):
            assert torch.allclose(getattr(mine, part)["default"].weight, getattr(peft_layer, part)["default"].weight,
                                  atol=1e-6)
        assert torch.allclose(mine.weight, peft_layer.base_layer.weight, atol=1e-6)  # the residual base


def test_olora_starts_as_the_base_and_saves_against_the_original_weights(tmp_path):
    model, ids = tiny_model("llama"), tiny_input()
    base = logits(model, ids)
    peftkit.inject(model, LoraConfig(r=4, init="olora", target_modules="all-linear"))
    assert (logits(model, ids) - base).abs().max() <= 1e-5
    perturb_adapter(model)  # "train"
    tuned = logits(model, ids)
    assert (tuned - base).abs().max() > 1e-2
    peftkit.save_adapter(model, tmp_path / "olora")
    saved = peftkit.io.adapters.read_adapter(tmp_path / "olora")[0]
    assert saved["r"] == 8 and saved["lora_alpha"] == 16  # rank 2r, the same scale
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "olora").eval()  # ORIGINAL weights
    assert (logits(peft_model, ids) - tuned).abs().max() <= 1e-5

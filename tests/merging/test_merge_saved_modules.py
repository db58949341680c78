"""modules_to_save (PEFT's full-module tensors): HF PEFT -> peftkit -> HF PEFT round trip, disable, merge."""

import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peftkit
from peftkit.merging.stream import merge_to_disk
from tests.merging.fixtures import load, max_param_diff, save_base
from tests.tiny import logits, tiny_input, tiny_model


def test_modules_to_save_round_trip_and_streaming_merge(tmp_path):
    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"],
                                                               modules_to_save=["model.norm", "input_layernorm"]))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    ids = tiny_input()
    reference = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")

    ours = peftkit.load_adapter(tiny_model("llama"), tmp_path / "peft")
    assert (logits(ours, ids) - reference).abs().max() <= 1e-6
    with peftkit.disable_adapters(ours):
        assert torch.equal(logits(ours, ids), logits(tiny_model("llama"), ids))
    peftkit.save_adapter(ours, tmp_path / "ours")
    back = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "ours"))
    assert (logits(back, ids) - reference).abs().max() <= 1e-6

    merge_to_disk(str(save_base("llama", tmp_path / "base")), [str(tmp_path / "peft")], str(tmp_path / "merged"))
    assert max_param_diff(load(tmp_path / "merged"), peft_model.merge_and_unload()) <= 1e-6
    merged_in_memory = peftkit.merge(ours)
    assert (logits(merged_in_memory, ids) - reference).abs().max() <= 1e-5

"""Adapters whose modules have different ranks (combine, compress --energy) are written at one rank with scale 1 and
no rank / alpha patterns, so that HF PEFT, vLLM (lora_alpha / r for every module) and llama.cpp (lora_alpha / the
tensor's rank) all apply the same deltas; target_modules are short names when those select exactly the modules."""

import json

import torch
from peft import PeftModel

import peftkit
from peftkit.merging.compress import compress
from peftkit.merging.deltas import combine, read_lora, write_lora
from peftkit.methods.lora.format import one_rank, target_modules_for
from tests.merging.fixtures import save_lora
from tests.merging.test_compress import finetune
from tests.tiny import logits, tiny_input, tiny_model


def _scales(config: dict, tensors_rank: int) -> dict[str, float]:
    """The scale each consumer reads from the config for a module whose tensors have rank `tensors_rank`."""
    r, alpha = config["r"], config["lora_alpha"]
    return {"vllm": alpha / r, "llama.cpp": alpha / tensors_rank, "peft": alpha / r}


def test_one_rank_pads_with_zeros_and_keeps_the_product():
    g = torch.Generator().manual_seed(0)
    factors = {"a": (torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g), None),
               "b": (torch.randn(4, 5, generator=g), torch.randn(3, 4, generator=g), None)}
    padded, rank = one_rank(factors)
    assert rank == 4 and padded["a"][0].shape == (4, 5) and padded["a"][1].shape == (3, 4)
    assert torch.equal(padded["a"][1] @ padded["a"][0], factors["a"][1] @ factors["a"][0])
    assert padded["b"][0] is factors["b"][0]


def test_target_names_short_only_when_exact():
    linear = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert target_modules_for(linear, adaptable=linear) == ["q_proj", "v_proj"]
    one_layer = linear[:2]  # layer 0 only: "q_proj" would also select layer 1
    assert target_modules_for(one_layer, adaptable=linear) == r"^(model\.layers\.0\.self_attn\.q_proj|model\.layers\.0\.self_attn\.v_proj)$"
    assert target_modules_for(linear, names=["q_proj", "v_proj", "k_proj"]) == ["q_proj", "v_proj"]
    assert target_modules_for(linear, names=None).startswith("^(")


def test_combined_mixed_ranks_mean_the_same_everywhere(tmp_path):
    x = save_lora("llama", tmp_path / "x", seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    y = save_lora("llama", tmp_path / "y", seed=4, r=2, lora_alpha=5, target_modules=["q_proj", "k_proj"])
    combined = combine([read_lora(x, 0.7), read_lora(y, -0.3)], "concat")
    assert {d.a.shape[0] for d in combined.deltas.values()} == {6, 4, 2}  # q: 4 + 2, v: 4, k: 2
    write_lora(combined, tmp_path / "c")
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (6, 6, {}, {})
    assert config["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    from safetensors.torch import load_file

    ranks = {v.shape[0] for k, v in load_file(tmp_path / "c" / "adapter_model.safetensors").items() if "lora_A" in k}
    assert ranks == {6}
    assert len(set(_scales(config, 6).values())) == 1  # every consumer: 6 / 6
    ids = tiny_input()
    model = tiny_model("llama")
    for i, (path, w) in enumerate([(x, 0.7), (y, -0.3)]):
        peftkit.load_adapter(model, path, name=f"n{i}")
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "lora_B") and f"n{i}" in module.lora_B:
                    module.lora_B[f"n{i}"].weight.mul_(w)
    expected = logits(peftkit.merge(model), ids)
    theirs = logits(PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "c")), ids)
    assert (theirs - expected).abs().max() <= 1e-4


def test_compress_energy_writes_one_rank_and_short_names(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    finetune("llama").save_pretrained(tmp_path / "ft")
    report = compress(str(tmp_path / "base"), str(tmp_path / "ft"), str(tmp_path / "c"), energy=0.9)
    ranks = {row.rank for row in report.rows}
    assert len(ranks) > 1  # the energy rule chose different ranks per module
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == max(ranks) and not config["rank_pattern"] and not config["alpha_pattern"]
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj",
                                        "v_proj"]
    ids = tiny_input()
    ours = logits(peftkit.load_adapter(tiny_model("llama"), tmp_path / "c"), ids)
    theirs = logits(PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "c")), ids)
    assert (ours - theirs).abs().max() <= 1e-4

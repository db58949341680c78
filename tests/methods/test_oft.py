"""OFT: injection into every tiny architecture, HF PEFT 0.21.2's format both ways, merge as PEFT merges, trainable
counts as PEFT counts, the Cayley forms, the memory hook, its options, and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import OFTConfig as PeftOFTConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peftkit
from peftkit import OFTConfig
from peftkit.core.counting import count_parameters
from peftkit.core.ops import merge_adapter, unmerge_adapter
from peftkit.errors import PeftkitError
from peftkit.memory import estimate_memory
from peftkit.methods.oft.layer import OftLayer, cayley, skew
from peftkit.train.config import load_train_config
from tests.tiny import ARCHS, logits, perturb_adapter, tiny_config, tiny_input, tiny_model

TARGETS = {"gpt2": ["c_attn", "c_fc"]}  # GPT-2's Conv1D layers (HF PEFT's OFT refuses Conv1D; peftkit rotates them)


@pytest.mark.parametrize("kind", ARCHS)
def test_identity_at_init_then_merge_and_unmerge(kind):
    model, ids = tiny_model(kind), tiny_input()
    base = logits(model, ids)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    peftkit.inject(model, OFTConfig(oft_block_size=8, target_modules=TARGETS.get(kind, "all-linear")))
    assert torch.equal(logits(model, ids), base)  # zero parameters: R = I
    perturb_adapter(model)
    adapted = logits(model, ids)
    assert (adapted - base).abs().max() > 1e-3
    merge_adapter(model)
    assert (logits(model, ids) - adapted).abs().max() <= 1e-5
    unmerge_adapter(model)
    restored = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".oft_R." not in k}
    assert all((restored[k] - w).abs().max() <= 1e-6 for k, w in weights.items())
    merged = peftkit.merge(model)
    assert not any(isinstance(m, OftLayer) for m in merged.modules())
    assert (logits(merged, ids) - adapted).abs().max() <= 1e-5


CASES = [
    ("llama", {"oft_block_size": 8, "target_modules": ["q_proj", "down_proj"]}),
    ("qwen2", {"r": 4, "oft_block_size": 0, "target_modules": "all-linear"}),  # q / k / v with biases
    ("llama", {"oft_block_size": 4, "use_cayley_neumann": False, "target_modules": ["v_proj", "o_proj"]}),
    ("mistral", {"oft_block_size": 8, "block_share": True, "coft": True, "eps": 1e-2}),
    ("gemma", {"oft_block_size": 16, "num_cayley_neumann_terms": 3, "layers_to_transform": [1]}),
]


@pytest.mark.parametrize("kind,options", CASES)
def test_peft_loads_peftkit_adapter(tmp_path, kind, options):
    model, ids = tiny_model(kind), tiny_input()
    peftkit.inject(model, OFTConfig(**options))
    perturb_adapter(model)
    ours = logits(model, ids)
    assert (ours - logits(tiny_model(kind), ids)).abs().max() > 1e-3  # not the base: the test can fail
    peftkit.save_adapter(model, tmp_path / "ad")
    theirs = PeftModel.from_pretrained(tiny_model(kind), tmp_path / "ad")
    assert (logits(theirs, ids) - ours).abs().max() <= 1e-5
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert len(saved) == sum(1 for n, _ in theirs.named_parameters() if ".oft_R." in n)
    again = peftkit.load_adapter(tiny_model(kind), tmp_path / "ad")
    assert torch.equal(logits(again, ids), ours)


@pytest.mark.parametrize("kind,options", CASES[:2])
def test_peftkit_loads_peft_adapter_and_merges_as_peft(tmp_path, kind, options):
    ids = tiny_input()
    peft_model = get_peft_model(tiny_model(kind), PeftOFTConfig(task_type="CAUSAL_LM", **options))
    perturb_adapter(peft_model)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    model = peftkit.load_adapter(tiny_model(kind), tmp_path / "peft")
    assert (logits(model, ids) - expected).abs().max() <= 1e-5
    ours, theirs = peftkit.merge(model).state_dict(), peft_model.merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    assert all((ours[k] - theirs[k]).abs().max() <= 1e-6 for k in ours)


def test_saved_layout_is_peft_021(tmp_path):
    model = tiny_model("llama")
    peftkit.inject(model, OFTConfig(oft_block_size=8))
    peftkit.save_adapter(model, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "OFT" and config["target_modules"] == ["q_proj", "v_proj"]
    assert (config["r"], config["oft_block_size"], config["use_cayley_neumann"]) == (0, 8, True)
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "ad" / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight"] == (4, 28)  # 32 / 8 blocks of 8


@pytest.mark.parametrize("kind,options", [("llama", {"oft_block_size": 8}), ("gemma", {"r": 2, "target_modules": "all-linear"}),
                                          ("qwen2", {"oft_block_size": 4, "block_share": True})])
def test_trainable_counts_equal_peft(kind, options):
    peft_options = {"oft_block_size": 0, **options} if "r" in options else options
    peft_model = get_peft_model(tiny_model(kind), PeftOFTConfig(**peft_options))
    ours = count_parameters(tiny_config(kind), "oft", **options)  # on the meta device, through the registry
    assert ours == peft_model.get_nb_trainable_parameters()


def test_width_not_divisible_names_the_module_and_what_fits():
    model = tiny_model("llama")  # hidden 32, intermediate 64
    with pytest.raises(PeftkitError, match=r"oft_block_size=12 does not divide the input width 32 of module "
                                           r"'model\.layers\.0\.self_attn\.q_proj'; .* oft_block_size=8 or 16") as err:
        peftkit.inject(model, OFTConfig(oft_block_size=12, target_modules="all-linear"))
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, OftLayer) for m in model.modules())  # checked before any module is replaced
    with pytest.raises(PeftkitError, match="exactly one of r .* and oft_block_size"):
        OFTConfig(r=4, oft_block_size=8)
    with pytest.raises(PeftkitError, match="bias='none'"):
        OFTConfig(bias="all")


def test_old_peft_formats_are_refused(tmp_path):
    model = tiny_model("llama")
    peftkit.inject(model, OFTConfig())
    peftkit.save_adapter(model, tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_model.safetensors"
    save_file({k.replace("oft_R", "oft_r"): v for k, v in load_file(path).items()}, path)
    with pytest.raises(PeftkitError, match="PEFT <= 0.15's OFT format"):
        peftkit.load_adapter(tiny_model("llama"), tmp_path / "ad")


def test_cayley_forms():
    """Exact Cayley is orthogonal; PEFT's Neumann series is the transpose of the exact form, to its order."""
    q = skew(torch.randn(3, 6, dtype=torch.float64) * 0.05, 4)
    exact = cayley(q, None)
    eye = torch.eye(4, dtype=torch.float64).expand_as(exact)
    assert (exact @ exact.transpose(1, 2) - eye).abs().max() < 1e-12
    assert (cayley(q, 20) - exact.transpose(1, 2)).abs().max() < 1e-12
    assert torch.equal(cayley(q, 1), eye) and torch.equal(cayley(q, 3), cayley(q, 4))  # PEFT's n = 3 has Q^3 too


def test_module_dropout_replaces_blocks_only_in_training():
    model = tiny_model("llama")
    peftkit.inject(model, OFTConfig(oft_block_size=4, module_dropout=0.5, target_modules=["q_proj"]))
    perturb_adapter(model)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    eye = torch.eye(4)
    assert not any(torch.equal(b, eye) for b in layer.blocks("default"))
    layer.train()
    assert sum(torch.equal(b, eye) for b in layer.blocks("default")) == 4  # int(0.5 x 8) of the 8 blocks


def test_options_and_estimate():
    cfg = load_train_config(None, {"method": "oft", "rank": 4, "set": {"use_cayley_neumann": "false", "coft": "true"}})
    config = peftkit.core.registry.get_method("oft").build_config(cfg.method_options())
    assert (config.r, config.oft_block_size, config.use_cayley_neumann, config.coft) == (4, 0, False, True)
    with pytest.raises(PeftkitError, match="method 'oft' has no option 'lora_alpha'"):
        load_train_config(None, {"method": "oft", "set": {"lora_alpha": "4"}})
    est = estimate_memory(tiny_config("llama"), "oft", precision="fp32", seq_len=32, oft_block_size=8)
    assert est.trainable_params == count_parameters(tiny_config("llama"), "oft", oft_block_size=8)[0] == 2 * 2 * 4 * 28
    lora = estimate_memory(tiny_config("llama"), "lora", precision="fp32", seq_len=32)
    assert est.breakdown["activations"] != lora.breakdown["activations"]  # its own hook, not LoRA's or nothing

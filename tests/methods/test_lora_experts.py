"""LoRA on MoE experts' fused 3-D weights and the router's weight (`target_parameters`), against HF PEFT's
ParamWrapper on tiny Qwen3-MoE and Mixtral: logits both ways, saved tensors, merging, trainable counts, training."""

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

import peftkit
from peftkit.core.counting import count_parameters
from peftkit.errors import PeftkitError
from peftkit.methods.lora import LoraConfig
from tests.methods.moe_helpers import EXPERTS, MOE_ARCHS, ROUTER, moe_config, moe_input, moe_model
from tests.tiny import logits, perturb_adapter

TARGETS = [EXPERTS + (ROUTER,), EXPERTS[1:]]  # experts and router; down_proj alone


def _ours(arch, targets, **extra):
    model = peftkit.inject(moe_model(arch), LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"],
                                                       target_parameters=targets, **extra))
    perturb_adapter(model)
    return model


def _theirs(arch, targets):
    return get_peft_model(moe_model(arch), PeftLoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"],
                                                          target_parameters=list(targets)))


@pytest.mark.parametrize("arch, targets", [("qwen3_moe", TARGETS[0]), ("mixtral", TARGETS[0]), ("mixtral", TARGETS[1])])
def test_peft_loads_ours_same_logits(tmp_path, arch, targets):
    model, ids = _ours(arch, targets), moe_input()
    ours = logits(model, ids)
    assert (ours - logits(moe_model(arch), ids)).abs().max() > 1e-3  # the adapter changes the output
    peftkit.save_adapter(model, tmp_path / "ad")
    theirs = PeftModel.from_pretrained(moe_model(arch), tmp_path / "ad")
    assert (logits(theirs, ids) - ours).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_we_load_peft_and_save_its_tensors(tmp_path, arch):
    """PEFT's adapter gives the same logits here, and peftkit writes it back tensor for tensor, config alike."""
    peft_model, ids = _theirs(arch, TARGETS[0]), moe_input()
    perturb_adapter(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    model = peftkit.load_adapter(moe_model(arch), tmp_path / "peft")
    assert (logits(model, ids) - logits(peft_model, ids)).abs().max() <= 1e-5
    peftkit.save_adapter(model, tmp_path / "ours")
    saved, expected = load_file(tmp_path / "ours" / "adapter_model.safetensors"), get_peft_model_state_dict(peft_model)
    assert sorted(saved) == sorted(expected)
    assert all(torch.equal(saved[k], expected[k]) for k in saved)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_merge_equals_peft_merge_and_unload(tmp_path, arch):
    model, ids = _ours(arch, TARGETS[0]), moe_input()
    peftkit.save_adapter(model, tmp_path / "ad")
    theirs = PeftModel.from_pretrained(moe_model(arch), tmp_path / "ad")
    adapted = logits(model, ids)
    peftkit.merge_adapter(model)
    assert (logits(model, ids) - adapted).abs().max() <= 1e-5
    peftkit.unmerge_adapter(model)
    assert (logits(model, ids) - adapted).abs().max() <= 1e-6
    merged, peft_merged = peftkit.merge(model), theirs.merge_and_unload()
    assert (logits(merged, ids) - adapted).abs().max() <= 1e-5
    for (name, w), (_, w_peft) in zip(merged.named_parameters(), peft_merged.named_parameters(), strict=True):
        assert (w - w_peft).abs().max() <= 1e-6, name


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_trainable_counts_equal_peft_and_meta_count(arch):
    model = peftkit.inject(moe_model(arch), LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERTS))
    expected = _theirs(arch, EXPERTS).get_nb_trainable_parameters()
    assert peftkit.trainable_parameters(model) == expected
    assert count_parameters(moe_config(arch), "lora", rank=2, target_modules="q_proj",
                            target_parameters=",".join(EXPERTS)) == expected


def test_a_training_step_moves_every_expert_pair():
    model = peftkit.inject(moe_model("qwen3_moe"), LoraConfig(r=2, target_modules="", target_parameters=EXPERTS))
    perturb_adapter(model)
    pairs = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(pairs) == 8 and all(".experts." in n for n in pairs)  # A, B of two weights in two layers
    model.train()
    ids = moe_input()
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(not torch.equal(p, pairs[n]) for n, p in model.named_parameters() if n in pairs)


@pytest.mark.parametrize("options, message", [
    (dict(target_parameters=EXPERTS, lora_dropout=0.1), "lora_dropout"),
    (dict(target_parameters=EXPERTS, use_dora=True), "use_dora"),
    (dict(target_parameters=EXPERTS, init="pissa"), "init"),
    (dict(target_modules=""), "nothing to adapt"),
])
def test_refused_configs(options, message):
    with pytest.raises(PeftkitError, match=message):
        LoraConfig(**options)


def test_unknown_parameter_lists_the_ones_there():
    with pytest.raises(PeftkitError, match="experts.gate_up_proj"):
        peftkit.inject(moe_model("mixtral"), LoraConfig(target_modules="", target_parameters=["experts.up"]))


@pytest.mark.parametrize("given", [{"target_parameters": ",".join(EXPERTS)},
                                   {"set": {"target_parameters": f"[{EXPERTS[0]}, {EXPERTS[1]}]"}}])
def test_flag_and_set_give_the_parameter_targets(given):
    from peftkit.core.registry import get_method
    from peftkit.train.config import load_train_config

    options = load_train_config(None, {**given, "target_modules": ""}).method_options()
    assert get_method("lora").build_config(options).target_parameters == EXPERTS


def test_offline_readers_refuse_parameter_adapters_in_one_line(tmp_path):
    """merge / combine / export read LoRA deltas per linear; an experts adapter is named, not misread."""
    from peftkit.merging.deltas import read_lora

    peftkit.save_adapter(_ours("qwen3_moe", EXPERTS), tmp_path / "ad")
    with pytest.raises(PeftkitError, match="target_parameters"):
        read_lora(tmp_path / "ad")

"""Weighted combinations of LoRA adapters: merged (concat / linear / svd) and saved as one adapter (`combine`)."""

import pytest
import torch
from peft import PeftModel

import peftkit
from peftkit.merging.deltas import combine, read_lora, write_lora
from peftkit.merging.stream import merge_to_disk
from tests.merging.fixtures import load, max_param_diff, save_base, save_lora
from tests.tiny import logits, tiny_input, tiny_model

WEIGHTS = [0.7, -0.3]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("combine")
    base = save_base("llama", tmp / "base")
    a = save_lora("llama", tmp / "a", seed=3)
    b = save_lora("llama", tmp / "b", seed=4, r=2, target_modules=["k_proj", "o_proj", "up_proj"], lora_alpha=5.0)
    return tmp, base, [str(a), str(b)]


def _reference(adapters):
    """In memory, independently: load both adapters, scale each B by its weight, merge (sums the deltas)."""
    model = tiny_model("llama")
    for i, (path, w) in enumerate(zip(adapters, WEIGHTS, strict=True)):
        peftkit.load_adapter(model, path, name=f"n{i}")
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "lora_B") and f"n{i}" in module.lora_B:
                    module.lora_B[f"n{i}"].weight.mul_(w)
    return peftkit.merge(model)


@pytest.mark.parametrize("how", ["concat", "linear"])
def test_weighted_merge_is_exact(setup, how):
    tmp, base, adapters = setup
    merge_to_disk(str(base), adapters, str(tmp / how), weights=WEIGHTS, combination=how)
    assert max_param_diff(load(tmp / how), _reference(adapters)) <= 1e-5


def test_svd_at_full_rank_is_exact_and_lower_rank_is_not(setup):
    tmp, base, adapters = setup
    reference = _reference(adapters)
    merge_to_disk(str(base), adapters, str(tmp / "svd6"), weights=WEIGHTS, combination="svd", rank=6)  # 4 + 2
    assert max_param_diff(load(tmp / "svd6"), reference) <= 1e-5
    merge_to_disk(str(base), adapters, str(tmp / "svd1"), weights=WEIGHTS, combination="svd", rank=1)
    assert max_param_diff(load(tmp / "svd1"), reference) > 1e-4


@pytest.mark.parametrize("how,rank", [("concat", None), ("svd", 3)])
def test_combined_adapter_loads_in_peftkit_and_peft(setup, how, rank):
    tmp, base, adapters = setup
    parts = [read_lora(p, w) for p, w in zip(adapters, WEIGHTS, strict=True)]
    combined = combine(parts, how, rank)
    write_lora(combined, tmp / f"adapter-{how}")
    ids = tiny_input()
    ours = logits(peftkit.load_adapter(tiny_model("llama"), tmp / f"adapter-{how}"), ids)
    peft = logits(PeftModel.from_pretrained(tiny_model("llama"), str(tmp / f"adapter-{how}")), ids)
    assert (ours - peft).abs().max() <= 1e-5
    merge_to_disk(str(base), adapters, str(tmp / f"m-{how}"), weights=WEIGHTS, combination=how, rank=rank)
    assert (logits(load(tmp / f"m-{how}"), ids) - ours).abs().max() <= 1e-4
    if how == "concat":
        assert (ours - logits(_reference(adapters), ids)).abs().max() <= 1e-5
